//! Frames over async byte streams (QUIC streams, the control socket).
use floe_proto::frame::{self, FrameError, Header, HEADER_LEN};
use floe_proto::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("i/o on the connection failed")]
    Io(#[source] std::io::Error),
    #[error("bad frame from the peer: {0}")]
    Frame(#[source] FrameError),
    #[error("unexpected frame from the peer: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
}

impl From<FrameError> for WireError {
    fn from(e: FrameError) -> Self {
        WireError::Frame(e)
    }
}

fn io(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// One frame: (kind, payload). The payload length is checked against
/// `max` before anything is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<(u8, Vec<u8>), WireError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(io)?;
    let h = Header::parse(&h, max)?;
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload).await.map_err(io)?;
    Ok((h.kind, payload))
}

/// Like [`read_frame`], into `buf` (grown when needed, never shrunk, so a
/// recycled buffer costs no page faults). Returns the kind and the length.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    buf: &mut Vec<u8>,
) -> Result<(u8, usize), WireError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(io)?;
    let h = Header::parse(&h, max)?;
    let len = h.len as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    r.read_exact(&mut buf[..len]).await.map_err(io)?;
    Ok((h.kind, len))
}

/// A control frame decoded as `M`.
pub async fn read_control<R: AsyncRead + Unpin, M: Message + Default>(r: &mut R, max: u32) -> Result<M, WireError> {
    let (kind, payload) = read_frame(r, max).await?;
    if kind != frame::KIND_CONTROL {
        return Err(WireError::Unexpected { expected: "a control frame", got: format!("frame kind {kind}") });
    }
    Ok(frame::decode(&payload)?)
}

pub async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), WireError> {
    w.write_all(bytes).await.map_err(io)
}

/// Hands `bytes` to the QUIC stream without copying them (the stream keeps
/// them until the peer acknowledges them).
pub async fn write_chunk(w: &mut quinn::SendStream, bytes: bytes::Bytes) -> Result<(), WireError> {
    w.write_chunk(bytes).await.map_err(|e| io(e.into()))
}

pub async fn write_control<W: AsyncWrite + Unpin, M: Message>(w: &mut W, msg: &M) -> Result<(), WireError> {
    write_bytes(w, &frame::control(msg)).await
}

/// Shorthand for a peer frame.
pub fn peer(msg: floe_proto::peer::frame::Msg) -> floe_proto::peer::Frame {
    floe_proto::peer::Frame { msg: Some(msg) }
}

/// The name of a peer frame's message, for errors.
pub fn frame_name(f: &floe_proto::peer::Frame) -> String {
    use floe_proto::peer::frame::Msg;
    match &f.msg {
        None => "an empty frame",
        Some(Msg::Hello(_)) => "hello",
        Some(Msg::HelloReply(_)) => "hello reply",
        Some(Msg::Preflight(_)) => "preflight",
        Some(Msg::PreflightReply(_)) => "preflight reply",
        Some(Msg::PassStart(_)) => "pass start",
        Some(Msg::PassEnd(_)) => "pass end",
        Some(Msg::PassAck(_)) => "pass ack",
        Some(Msg::FinalImage(_)) => "final image",
        Some(Msg::FileChunk(_)) => "file chunk",
        Some(Msg::Ready(_)) => "ready",
        Some(Msg::Commit(_)) => "commit",
        Some(Msg::Done(_)) => "done",
        Some(Msg::Abort(_)) => "abort",
        Some(Msg::Query(_)) => "query",
        Some(Msg::QueryReply(_)) => "query reply",
        Some(Msg::Layout(_)) => "layout",
        Some(Msg::DeletedFile(_)) => "deleted file",
    }
    .to_string()
}
