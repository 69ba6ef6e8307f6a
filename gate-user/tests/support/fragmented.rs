//! IP fragments as a host sends them on a 1500-byte MTU: a frame's IP payload cut into
//! pieces of at most 1480 (IPv4) or 1448 (IPv6, after the fragment header) bytes.

/// The fragments of the IPv4 `frame` (Ethernet, a 20-byte IPv4 header, payload), first
/// fragment first, all with identification `id`.
pub fn ipv4(frame: &[u8], id: u16) -> Vec<Vec<u8>> {
    const PIECE: usize = 1480;
    let (head, payload) = frame.split_at(14 + 20);
    payload
        .chunks(PIECE)
        .enumerate()
        .map(|(i, piece)| {
            let more = (i + 1) * PIECE < payload.len();
            let field = (i * PIECE / 8) as u16 | if more { 0x2000 } else { 0 };
            let mut fragment = head.to_vec();
            fragment[16..18].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            fragment[18..20].copy_from_slice(&id.to_be_bytes());
            fragment[20..22].copy_from_slice(&field.to_be_bytes());
            fragment.extend_from_slice(piece);
            fragment
        })
        .collect()
}

/// The fragments of the IPv6 `frame` (Ethernet, a 40-byte IPv6 header with no extension
/// headers, payload), each with a fragment header of identification `id`.
pub fn ipv6(frame: &[u8], id: u32) -> Vec<Vec<u8>> {
    const PIECE: usize = 1448;
    let (head, payload) = frame.split_at(14 + 40);
    let next_header = head[14 + 6];
    payload
        .chunks(PIECE)
        .enumerate()
        .map(|(i, piece)| {
            let more = (i + 1) * PIECE < payload.len();
            let field = (i * PIECE) as u16 | u16::from(more);
            let mut fragment = head.to_vec();
            fragment[18..20].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
            fragment[20] = 44;
            fragment.extend_from_slice(&[next_header, 0]);
            fragment.extend_from_slice(&field.to_be_bytes());
            fragment.extend_from_slice(&id.to_be_bytes());
            fragment.extend_from_slice(piece);
            fragment
        })
        .collect()
}
