//! Framing shared by the peer protocol and the control API (sans-IO).
//!
//! A frame is an 8-byte header — magic `FP`, kind, flags (0), payload length
//! as little-endian u32 — and the payload. Receivers refuse a length above
//! their limit before reading the payload, so a peer can never make the
//! other side allocate more than it agreed to.
use crate::Message;

pub const MAGIC: [u8; 2] = *b"FP";
pub const HEADER_LEN: usize = 8;
/// Payload is one protobuf message (`peer::Frame`, `control::ControlRequest`, `control::ControlEvent`).
pub const KIND_CONTROL: u8 = 1;
/// Payload is u32 length, a `peer::PageBatch`, then page data.
pub const KIND_PAGES: u8 = 2;
/// Peer protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default largest frame payload accepted.
pub const DEFAULT_MAX_FRAME: u32 = 16 << 20;
/// Largest `PageBatch` header inside a pages frame.
pub const MAX_BATCH_HEADER: u32 = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    BadMagic([u8; 2]),
    UnknownKind(u8),
    TooLarge { len: u32, max: u32 },
    Truncated(&'static str),
    Decode(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic(m) => write!(f, "not a floe frame (magic {m:02x?})"),
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::TooLarge { len, max } => write!(f, "frame of {len} bytes exceeds the limit of {max}"),
            FrameError::Truncated(what) => write!(f, "truncated frame: {what}"),
            FrameError::Decode(e) => write!(f, "malformed message: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: u32,
}

impl Header {
    /// Checks magic, kind and length against `max`.
    pub fn parse(b: &[u8; HEADER_LEN], max: u32) -> Result<Header, FrameError> {
        if b[..2] != MAGIC {
            return Err(FrameError::BadMagic([b[0], b[1]]));
        }
        let kind = b[2];
        if kind != KIND_CONTROL && kind != KIND_PAGES {
            return Err(FrameError::UnknownKind(kind));
        }
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Header { kind, len })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let l = self.len.to_le_bytes();
        [MAGIC[0], MAGIC[1], self.kind, 0, l[0], l[1], l[2], l[3]]
    }
}

/// A control frame holding `msg`.
pub fn control<M: Message>(msg: &M) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&Header { kind: KIND_CONTROL, len: body.len() as u32 }.encode());
    out.extend_from_slice(&body);
    out
}

/// Decodes a control frame's payload.
pub fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, FrameError> {
    M::decode(payload).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Header and batch description of a pages frame whose `data_len` bytes
/// of data the caller sends right after.
pub fn pages_prefix(batch: &crate::peer::PageBatch, data_len: usize) -> Vec<u8> {
    let hdr = batch.encode_to_vec();
    let len = 4 + hdr.len() + data_len;
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + hdr.len());
    out.extend_from_slice(&Header { kind: KIND_PAGES, len: len as u32 }.encode());
    out.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
    out.extend_from_slice(&hdr);
    out
}

/// Splits a pages frame's payload into its batch description and data.
pub fn split_pages(payload: &[u8]) -> Result<(crate::peer::PageBatch, &[u8]), FrameError> {
    let l: [u8; 4] = payload.get(..4).and_then(|s| s.try_into().ok()).ok_or(FrameError::Truncated("batch length"))?;
    let l = u32::from_le_bytes(l);
    if l > MAX_BATCH_HEADER {
        return Err(FrameError::TooLarge { len: l, max: MAX_BATCH_HEADER });
    }
    let end = 4 + l as usize;
    let hdr = payload.get(4..end).ok_or(FrameError::Truncated("batch description"))?;
    let batch = decode::<crate::peer::PageBatch>(hdr)?;
    Ok((batch, &payload[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer;

    #[test]
    fn control_round_trip() {
        let f = peer::Frame { msg: Some(peer::frame::Msg::Commit(peer::Commit::default())) };
        let bytes = control(&f);
        let h = Header::parse(bytes[..8].try_into().expect("8 bytes"), 1024).expect("header");
        assert_eq!(h.kind, KIND_CONTROL);
        assert_eq!(h.len as usize, bytes.len() - 8);
        let back: peer::Frame = decode(&bytes[8..]).expect("decode");
        assert_eq!(back, f);
    }

    #[test]
    fn pages_round_trip() {
        let b = peer::PageBatch { pass: 3, pid: 42, raw_len: 8192, ..Default::default() };
        let data = vec![7u8; 100];
        let mut bytes = pages_prefix(&b, data.len());
        bytes.extend_from_slice(&data);
        let h = Header::parse(bytes[..8].try_into().expect("8 bytes"), 1 << 20).expect("header");
        assert_eq!(h.kind, KIND_PAGES);
        let (back, d) = split_pages(&bytes[8..]).expect("split");
        assert_eq!(back, b);
        assert_eq!(d, &data[..]);
    }

    #[test]
    fn bad_frames_refused() {
        assert_eq!(Header::parse(b"XX\x01\0\0\0\0\0", 10), Err(FrameError::BadMagic(*b"XX")));
        assert_eq!(Header::parse(b"FP\x09\0\0\0\0\0", 10), Err(FrameError::UnknownKind(9)));
        assert_eq!(Header::parse(b"FP\x01\0\xff\0\0\0", 10), Err(FrameError::TooLarge { len: 255, max: 10 }));
        assert!(split_pages(&[1, 0]).is_err());
        assert!(split_pages(&[0xff, 0xff, 0xff, 0x7f]).is_err());
        assert!(split_pages(&[5, 0, 0, 0, 1]).is_err());
        assert!(decode::<peer::Frame>(&[0xff, 0xff, 0xff]).is_err());
    }
}
