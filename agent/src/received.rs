//! Segments a network lock dropped, on the wire: the source's capture goes
//! to the target in `Commit`, which delivers them to the restored
//! connections once they run (see `floe_netfilter::Capture`).
use floe_netfilter::Segment;
use floe_proto::peer as pp;

/// At most this many payload bytes travel in one `Commit`; segments past it
/// are left to the peers' retransmissions.
pub const MAX_BYTES: usize = 8 * 1024 * 1024;

/// Header bytes one segment may carry: IPv6 (40) and TCP with options (60).
const MAX_HEADER: usize = 100;

/// The segments, up to [`MAX_BYTES`] of payload.
pub fn to_wire(segs: &[Segment]) -> Vec<pp::DroppedSegment> {
    let mut total = 0;
    segs.iter()
        .take_while(|s| {
            total += s.payload.len();
            total <= MAX_BYTES
        })
        .map(|s| pp::DroppedSegment { header: s.header.clone(), payload: s.payload.clone() })
        .collect()
}

/// Back from the wire; malformed entries are skipped, and so is everything
/// past [`MAX_BYTES`].
pub fn from_wire(segs: Vec<pp::DroppedSegment>) -> Vec<Segment> {
    let mut total = 0;
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        total += s.payload.len();
        if total > MAX_BYTES {
            tracing::warn!("the source sent more dropped data than allowed; the rest is left to the peers");
            break;
        }
        let parsed = (s.header.len() <= MAX_HEADER).then(|| Segment::parse(&[s.header, s.payload].concat())).flatten();
        match parsed {
            Some(seg) => out.push(seg),
            None => tracing::warn!("ignoring a malformed dropped segment from the source"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn packet(seq: u32, payload: &[u8]) -> Vec<u8> {
        let total = 40 + payload.len();
        let mut p =
            vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 9, 10, 0, 0, 1];
        p.extend_from_slice(&[0x9c, 0x40, 0x18, 0xeb]);
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn segments_round_trip() {
        let segs: Vec<Segment> =
            [packet(7, b"GET a\r\n"), packet(u32::MAX, b"")].iter().map(|p| Segment::parse(p).unwrap()).collect();
        assert_eq!(from_wire(to_wire(&segs)), segs);
    }

    #[test]
    fn malformed_and_oversized_input_is_dropped() {
        let mut w = to_wire(&[Segment::parse(&packet(1, b"ok")).unwrap()]);
        w.push(pp::DroppedSegment { header: vec![0x45, 1, 2], payload: b"x".to_vec() });
        w.push(pp::DroppedSegment { header: vec![0x45; 200], payload: vec![] });
        assert_eq!(from_wire(w).len(), 1);
        let big = vec![0u8; MAX_BYTES / 2 + 1];
        let many: Vec<Segment> =
            (0..3).map(|i| Segment { payload: big.clone(), ..Segment::parse(&packet(i, b"")).unwrap() }).collect();
        assert_eq!(to_wire(&many).len(), 1);
    }
}
