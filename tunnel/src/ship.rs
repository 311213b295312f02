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

/// A message body's first allocation at most; it grows as its bytes arrive.
const FIRST_READ: usize = 1 << 20;

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
    // Memory follows the bytes that arrive, not the length the peer announced: a length
    // of 300 MiB followed by nothing costs a small buffer, not 300 MiB.
    let mut body = Vec::with_capacity(len.min(FIRST_READ));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the stream ended {} bytes into a {len}-byte message",
                body.len()
            ),
        ));
    }
    ShipMessage::decode_body(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_cut_short_is_an_error_and_a_whole_one_reads_back() {
        // A 300 MiB length and then the end of the stream.
        let mut cut: &[u8] = &[0x12, 0xc0, 0x00, 0x00, 1, 2, 3];
        let e = read(&mut cut).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("3 bytes into a"), "{e}");
        // Over the cap: refused before reading.
        let mut big: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            read(&mut big).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // Nothing at all: a clean end.
        let mut none: &[u8] = &[];
        assert!(read(&mut none).await.unwrap().is_none());
        // A real message, larger than the first allocation, reads back.
        let batch = ShipMessage::Batch {
            first_seq: 1,
            records: vec![vec![7u8; 1_500_000], vec![8u8; 10]],
        };
        let ack = ShipMessage::Ack { seq: 42 };
        let mut buf = Vec::new();
        write(&mut buf, &batch).await.unwrap();
        write(&mut buf, &ack).await.unwrap();
        let mut r: &[u8] = &buf;
        assert_eq!(read(&mut r).await.unwrap(), Some(batch));
        assert_eq!(read(&mut r).await.unwrap(), Some(ack));
        assert!(read(&mut r).await.unwrap().is_none());
    }
}
