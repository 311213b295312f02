//! The versioned handshake on the control stream: Hello from relay-inner, HelloAck or
//! Error from relay-outer. A version mismatch is refused with a frame that says both
//! versions, so each side can log a clear reason instead of hanging.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::codec::{read_frame, write_frame, CodecError};
use relay_proto::frame::{ErrorCode, Frame, Hello, HelloAck};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// How long a handshake step may take unless the caller's config says otherwise.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer refused us with a reason.
    #[error("refused by peer ({code}): {message}")]
    Refused {
        /// Why, machine readable.
        code: ErrorCode,
        /// Why, in the peer's words.
        message: String,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The peer sent a frame that does not belong here.
    #[error("unexpected {0} frame during the handshake")]
    Unexpected(&'static str),
    /// Reading or writing failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// relay-inner's side: sends `hello`, returns relay-outer's acceptance.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    ctrl: &mut S,
    hello: Hello,
    deadline: Duration,
) -> Result<HelloAck, HandshakeError> {
    write_frame(ctrl, &Frame::Hello(hello), deadline).await?;
    match read_frame(ctrl, deadline).await? {
        Frame::HelloAck(ack) if ack.protocol == PROTOCOL_VERSION => Ok(ack),
        Frame::HelloAck(ack) => Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: ack.protocol,
        }),
        Frame::Error { code, message } => Err(HandshakeError::Refused { code, message }),
        other => Err(HandshakeError::Unexpected(other.kind_name())),
    }
}

/// relay-outer's side, first half: reads the Hello (within `deadline`) and checks the
/// version; on a mismatch the peer is told before the error is returned. The caller
/// decides whether to [`accept`] or [`refuse`].
pub async fn server_read_hello<S: AsyncRead + AsyncWrite + Unpin>(
    ctrl: &mut S,
    deadline: Duration,
) -> Result<Hello, HandshakeError> {
    let hello = match read_frame(ctrl, deadline).await? {
        Frame::Hello(h) => h,
        other => {
            let msg = format!("expected Hello, got {}", other.kind_name());
            let _ = refuse(ctrl, ErrorCode::Protocol, &msg).await;
            return Err(HandshakeError::Unexpected(other.kind_name()));
        }
    };
    if hello.protocol != PROTOCOL_VERSION {
        let msg = format!(
            "relay-outer speaks protocol version {PROTOCOL_VERSION}, relay-inner sent {}; upgrade the older side",
            hello.protocol
        );
        let _ = refuse(ctrl, ErrorCode::VersionMismatch, &msg).await;
        return Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: hello.protocol,
        });
    }
    Ok(hello)
}

/// relay-outer's acceptance.
pub async fn accept<S: AsyncWrite + Unpin>(
    ctrl: &mut S,
    tunnel: &str,
    session_id: u64,
) -> Result<(), HandshakeError> {
    let ack = Frame::HelloAck(HelloAck {
        protocol: PROTOCOL_VERSION,
        tunnel: tunnel.to_owned(),
        session_id,
    });
    Ok(write_frame(ctrl, &ack, HANDSHAKE_TIMEOUT).await?)
}

/// Tells the peer why it is refused.
pub async fn refuse<S: AsyncWrite + Unpin>(
    ctrl: &mut S,
    code: ErrorCode,
    message: &str,
) -> Result<(), HandshakeError> {
    let f = Frame::Error {
        code,
        message: message.to_owned(),
    };
    Ok(write_frame(ctrl, &f, HANDSHAKE_TIMEOUT).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(protocol: u16) -> Hello {
        Hello {
            protocol,
            node: "n1".into(),
            services: vec!["pg".into()],
            features: vec![],
        }
    }

    #[tokio::test]
    async fn matching_versions_agree() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let h = server_read_hello(&mut b, HANDSHAKE_TIMEOUT).await.unwrap();
            accept(&mut b, "site-a", 9).await.unwrap();
            h
        });
        let ack = client(&mut a, hello(PROTOCOL_VERSION), HANDSHAKE_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(ack.tunnel, "site-a");
        assert_eq!(server.await.unwrap().services, vec!["pg".to_string()]);
    }

    #[tokio::test]
    async fn version_mismatch_is_a_clear_error_on_both_sides() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server =
            tokio::spawn(async move { server_read_hello(&mut b, HANDSHAKE_TIMEOUT).await });
        let err = client(&mut a, hello(PROTOCOL_VERSION + 1), HANDSHAKE_TIMEOUT)
            .await
            .unwrap_err();
        match &err {
            HandshakeError::Refused { code, message } => {
                assert_eq!(*code, ErrorCode::VersionMismatch);
                assert!(message.contains("speaks protocol version 1"), "{message}");
                assert!(message.contains("sent 2"), "{message}");
            }
            e => panic!("unexpected {e}"),
        }
        let serr = server.await.unwrap().unwrap_err();
        assert!(
            matches!(serr, HandshakeError::VersionMismatch { ours: 1, theirs: 2 }),
            "{serr}"
        );
    }

    #[tokio::test]
    async fn a_server_answering_another_version_is_refused_by_the_client() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let _ = read_frame(&mut b, HANDSHAKE_TIMEOUT).await;
            let ack = Frame::HelloAck(HelloAck {
                protocol: 7,
                tunnel: "t".into(),
                session_id: 1,
            });
            write_frame(&mut b, &ack, HANDSHAKE_TIMEOUT).await.unwrap();
        });
        let err = client(&mut a, hello(PROTOCOL_VERSION), HANDSHAKE_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::VersionMismatch { ours: 1, theirs: 7 }
        ));
    }
}
