//! Reading and writing frames on a byte stream, always with a deadline.
//!
//! Frames are read one at a time with exact-length reads, so nothing after a frame is
//! consumed: once `Open`/`OpenOk` are through, the same stream carries raw spliced bytes.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use relay_proto::frame::{Frame, FrameError, LEN_PREFIX};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer closed the stream cleanly between frames.
    #[error("peer closed the stream")]
    Closed,
    /// No whole frame arrived within the deadline.
    #[error("no frame within {0:?}")]
    Timeout(Duration),
    /// The bytes were not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(#[from] FrameError),
    /// The stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Reads one frame, failing if it does not arrive whole within `deadline`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    deadline: Duration,
) -> Result<Frame, CodecError> {
    match tokio::time::timeout(deadline, read_frame_no_deadline(r)).await {
        Ok(res) => res,
        Err(_) => Err(CodecError::Timeout(deadline)),
    }
}

/// Reads one frame with no deadline of its own; callers bound it (the control loop
/// does so with its keepalive timeout).
pub async fn read_frame_no_deadline<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, CodecError> {
    let mut prefix = [0u8; LEN_PREFIX];
    // A clean EOF before the first byte of a frame is a close, not an error.
    let n = r.read(&mut prefix[..1]).await?;
    if n == 0 {
        return Err(CodecError::Closed);
    }
    r.read_exact(&mut prefix[1..]).await?;
    let len = Frame::body_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Frame::decode_body(&body)?)
}

/// Writes one frame and flushes, failing if that takes longer than `deadline`.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    deadline: Duration,
) -> Result<(), CodecError> {
    let mut buf = Vec::with_capacity(64);
    frame.encode(&mut buf)?;
    let io = async {
        w.write_all(&buf).await?;
        w.flush().await
    };
    match tokio::time::timeout(deadline, io).await {
        Ok(res) => Ok(res?),
        Err(_) => Err(CodecError::Timeout(deadline)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frame_then_raw_bytes_on_one_stream() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let t = Duration::from_secs(5);
        write_frame(&mut a, &Frame::OpenOk, t).await.unwrap();
        a.write_all(b"raw payload").await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b, t).await.unwrap(), Frame::OpenOk);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw payload");
    }

    #[tokio::test]
    async fn garbage_and_silence_are_errors_not_hangs() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        let e = read_frame(&mut b, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(e, CodecError::Malformed(FrameError::TooLarge(_))),
            "{e}"
        );

        let (_a, mut b) = tokio::io::duplex(1024);
        let e = read_frame(&mut b, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, CodecError::Timeout(_)));

        let (a, mut b) = tokio::io::duplex(1024);
        drop(a);
        let e = read_frame(&mut b, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, CodecError::Closed));
    }
}
