//! Control frames from the tunnel peer: any bytes give a frame or an error.
/// Runs one input.
pub fn run(data: &[u8]) {
    use relay_proto::frame::Frame;
    if let Ok(Some((frame, used))) = Frame::decode(data) {
        assert!(used <= data.len());
        // What decodes encodes again, and that decodes to the same frame.
        let mut out = Vec::new();
        frame.encode(&mut out).expect("a decoded frame encodes");
        assert_eq!(Frame::decode(&out), Ok(Some((frame, out.len()))));
    }
}
