//! The head of an HTTP proxy's answer to `CONNECT` (`routy_tunnel::proxy`): any bytes give
//! an open tunnel, a refusal with a short reason, or an error.
use routy_tunnel::proxy::{parse_connect_answer, socks_reply_meaning, ConnectAnswer};

/// Runs one input.
pub fn run(data: &[u8]) {
    if let Ok(ConnectAnswer::Refused { answer, reason }) = parse_connect_answer(data) {
        // What goes into logs and metric labels stays short.
        assert!(answer.chars().count() <= 200 + 3 + 200, "{answer:?}");
        assert!(["auth", "forbidden", "refused"].contains(&reason));
    }
    if let Some(&code) = data.first() {
        let _ = socks_reply_meaning(code);
    }
}
