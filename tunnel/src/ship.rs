//! CDC shipping messages ([`ShipMessage`], defined in `relay-proto`) over a tunnel stream.

use std::io;

use relay_proto::cdc::{CdcError, ShipMessage, MAX_SHIP_MESSAGE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Writes one message and flushes.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, msg: &ShipMessage) -> io::Result<()> {
    let buf = msg
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one message; `Ok(None)` on a clean end of stream before a message starts.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<ShipMessage>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_SHIP_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            CdcError::TooLarge(len),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    ShipMessage::decode_body(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
