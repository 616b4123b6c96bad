//! Forward error correction by coding groups (the codec of `redundancy`): up to
//! `MAX_DATA_SHARDS` data datagrams and up to `MAX_PARITY_SHARDS` parity shards per group,
//! systematic Reed–Solomon over GF(2^8) from the `reed-solomon-erasure` crate (no field
//! arithmetic of our own). Its decoding costs what the lost shards cost; `reed-solomon-simd`
//! (Leopard) evaluates a polynomial over all of GF(2^16) for every decode, about 200 µs
//! whatever the group, which at a few thousand groups a second is a core.
//!
//! Invariants:
//! - Data goes out as it comes: a datagram is sent at once with its `DataTag` (group and
//!   index); parity follows when the sender closes the group (full, or at its deadline).
//! - A group's shards are its datagrams, each prefixed by its length (u16) and padded to
//!   the group's `shard_len` (the longest plus 2, rounded up to even).
//! - The decoder keeps at most `DECODER_WINDOW` groups, each in a slot reused for the
//!   group `DECODER_WINDOW` later: its memory is bounded however many groups arrive and
//!   whatever their headers say. A group older than the window is dropped and counted.
//! - Every datagram is delivered at most once: received data is delivered by the caller
//!   as it arrives (`handle_data` says whether), and reconstruction gives only the ones
//!   still missing.
//! - Every header field is checked before it sizes anything; nothing here panics on input.

use reed_solomon_erasure::galois_8::ReedSolomon;

/// Codecs kept per encoder or decoder, one per group shape (data and parity counts):
/// building one inverts a matrix, so the shapes in use are kept; a new shape beyond
/// these takes the place of the one used longest ago.
const CODECS_KEPT: usize = 8;

/// Codecs by shape, most recently used last.
#[derive(Default)]
struct Codecs(Vec<((usize, usize), ReedSolomon)>);

impl Codecs {
    fn get(&mut self, k: usize, r: usize) -> Result<&ReedSolomon, FecError> {
        if let Some(i) = self.0.iter().position(|(shape, _)| *shape == (k, r)) {
            let entry = self.0.remove(i);
            self.0.push(entry);
        } else {
            let codec = ReedSolomon::new(k, r).map_err(|_| FecError::Codec)?;
            if self.0.len() == CODECS_KEPT {
                self.0.remove(0);
            }
            self.0.push(((k, r), codec));
        }
        Ok(&self.0.last().expect("just pushed").1)
    }
}

/// Data datagrams per group, at most.
pub const MAX_DATA_SHARDS: usize = 16;
/// Parity shards per group, at most.
pub const MAX_PARITY_SHARDS: usize = 16;
/// The largest datagram a group carries.
pub const MAX_DATAGRAM: usize = 1500;
/// The largest shard: a datagram, its length prefix, one byte of padding.
pub const MAX_SHARD: usize = MAX_DATAGRAM + SHARD_PADDING;
/// Groups the decoder holds at once.
pub const DECODER_WINDOW: u32 = 16;
/// A data datagram's tag on the wire: group u32 | index u8.
pub const DATA_TAG_LEN: usize = 5;
/// A parity shard's header on the wire: group u32 | index u8 | data count u8 | parity
/// count u8 | shard length u16.
pub const PARITY_HEADER_LEN: usize = 9;

const LEN_PREFIX: usize = 2;
/// A shard outgrows its longest datagram by at most this: the length prefix and one byte
/// to make its length even.
pub const SHARD_PADDING: usize = LEN_PREFIX + 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    #[error("truncated")]
    Truncated,
    #[error("a field out of range")]
    BadField,
    #[error("the group is full")]
    GroupFull,
    #[error("the datagram is larger than a group carries")]
    TooLarge,
    #[error("no data in the group")]
    EmptyGroup,
    #[error("the codec refused the shards")]
    Codec,
}

/// Where a data datagram sits: its group and its index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataTag {
    pub group: u32,
    pub index: u8,
}

impl DataTag {
    pub fn emit(&self, b: &mut [u8; DATA_TAG_LEN]) {
        b[..4].copy_from_slice(&self.group.to_be_bytes());
        b[4] = self.index;
    }

    pub fn parse(b: &[u8]) -> Result<Self, FecError> {
        let b = b.get(..DATA_TAG_LEN).ok_or(FecError::Truncated)?;
        let tag = Self { group: u32::from_be_bytes([b[0], b[1], b[2], b[3]]), index: b[4] };
        if usize::from(tag.index) >= MAX_DATA_SHARDS {
            return Err(FecError::BadField);
        }
        Ok(tag)
    }
}

/// A parity shard's header: its group, its index among the parity shards, and the
/// group's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityHeader {
    pub group: u32,
    pub index: u8,
    pub data_count: u8,
    pub parity_count: u8,
    pub shard_len: u16,
}

impl ParityHeader {
    pub fn emit(&self, b: &mut [u8; PARITY_HEADER_LEN]) {
        b[..4].copy_from_slice(&self.group.to_be_bytes());
        b[4] = self.index;
        b[5] = self.data_count;
        b[6] = self.parity_count;
        b[7..9].copy_from_slice(&self.shard_len.to_be_bytes());
    }

    /// Parses and checks a header: counts within bounds, index within its count, an even
    /// shard length that holds at least a length prefix and at most `MAX_SHARD`.
    pub fn parse(b: &[u8]) -> Result<Self, FecError> {
        let b = b.get(..PARITY_HEADER_LEN).ok_or(FecError::Truncated)?;
        let h = Self {
            group: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            index: b[4],
            data_count: b[5],
            parity_count: b[6],
            shard_len: u16::from_be_bytes([b[7], b[8]]),
        };
        let (k, r, len) = (usize::from(h.data_count), usize::from(h.parity_count), usize::from(h.shard_len));
        let ok = (1..=MAX_DATA_SHARDS).contains(&k)
            && (1..=MAX_PARITY_SHARDS).contains(&r)
            && h.index < h.parity_count
            && (LEN_PREFIX..=MAX_SHARD).contains(&len)
            && len % 2 == 0;
        if ok {
            Ok(h)
        } else {
            Err(FecError::BadField)
        }
    }
}

/// A closed group: what the parity shards written by `FecEncoder::close` are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedGroup {
    pub group: u32,
    pub data_count: u8,
    pub parity_count: u8,
    /// Each parity shard's length; shard `i` is `out[i * shard_len..(i + 1) * shard_len]`.
    pub shard_len: u16,
}

impl ClosedGroup {
    /// The header of parity shard `index`.
    pub fn header(&self, index: u8) -> ParityHeader {
        ParityHeader {
            group: self.group,
            index,
            data_count: self.data_count,
            parity_count: self.parity_count,
            shard_len: self.shard_len,
        }
    }
}

/// The sender's side: the open group's datagrams, kept (copied once) until the group
/// closes. Its buffers and the codec's are reused from group to group.
pub struct FecEncoder {
    group: u32,
    /// `MAX_DATA_SHARDS` slots of `MAX_SHARD` bytes: length prefix, datagram.
    shards: Vec<u8>,
    count: usize,
    longest: usize,
    codecs: Codecs,
}

impl Default for FecEncoder {
    fn default() -> Self {
        Self::new(0)
    }
}

impl FecEncoder {
    /// An encoder whose first group is `first_group`.
    pub fn new(first_group: u32) -> Self {
        Self {
            group: first_group,
            shards: vec![0; MAX_DATA_SHARDS * MAX_SHARD],
            count: 0,
            longest: 0,
            codecs: Codecs::default(),
        }
    }

    /// Data datagrams in the open group.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The group the next `push` opens or joins.
    pub fn next_group(&self) -> u32 {
        self.group
    }

    /// Drops the open group without parity; the next group opens.
    pub fn discard(&mut self) {
        if self.count > 0 {
            self.group = self.group.wrapping_add(1);
        }
        self.count = 0;
        self.longest = 0;
    }

    /// Adds `datagram` to the open group; returns its tag, to send with it now.
    pub fn push(&mut self, datagram: &[u8]) -> Result<DataTag, FecError> {
        if self.count == MAX_DATA_SHARDS {
            return Err(FecError::GroupFull);
        }
        if datagram.len() > MAX_DATAGRAM {
            return Err(FecError::TooLarge);
        }
        let slot = &mut self.shards[self.count * MAX_SHARD..][..MAX_SHARD];
        slot[..LEN_PREFIX].copy_from_slice(&(datagram.len() as u16).to_be_bytes());
        slot[LEN_PREFIX..LEN_PREFIX + datagram.len()].copy_from_slice(datagram);
        let tag = DataTag { group: self.group, index: self.count as u8 };
        self.count += 1;
        self.longest = self.longest.max(datagram.len());
        Ok(tag)
    }

    /// Closes the open group with `parity_count` parity shards, written one after another
    /// into `out` (at least `parity_count * MAX_SHARD` bytes); the next group opens.
    pub fn close(&mut self, parity_count: usize, out: &mut [u8]) -> Result<ClosedGroup, FecError> {
        if self.count == 0 {
            return Err(FecError::EmptyGroup);
        }
        if !(1..=MAX_PARITY_SHARDS).contains(&parity_count) {
            return Err(FecError::BadField);
        }
        let shard_len = (LEN_PREFIX + self.longest).next_multiple_of(2);
        if out.len() < parity_count * shard_len {
            return Err(FecError::Truncated);
        }
        let closed = ClosedGroup {
            group: self.group,
            data_count: self.count as u8,
            parity_count: parity_count as u8,
            shard_len: shard_len as u16,
        };
        let codec = self.codecs.get(self.count, parity_count)?;
        let mut data: [&[u8]; MAX_DATA_SHARDS] = [&[]; MAX_DATA_SHARDS];
        for (i, shard) in self.shards.chunks_exact_mut(MAX_SHARD).take(self.count).enumerate() {
            let shard = &mut shard[..shard_len];
            // what follows a shorter datagram is zero in every shard of the group
            let used = LEN_PREFIX + usize::from(u16::from_be_bytes([shard[0], shard[1]]));
            shard[used..].fill(0);
            data[i] = shard;
        }
        let mut parity_shards = out[..parity_count * shard_len].chunks_exact_mut(shard_len);
        let mut parity: [&mut [u8]; MAX_PARITY_SHARDS] =
            std::array::from_fn(|_| parity_shards.next().unwrap_or(&mut []));
        codec.encode_sep(&data[..self.count], &mut parity[..parity_count]).map_err(|_| FecError::Codec)?;
        self.group = self.group.wrapping_add(1);
        self.count = 0;
        self.longest = 0;
        Ok(closed)
    }
}

/// What the decoder counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecStats {
    /// Datagrams rebuilt from parity.
    pub recovered: u64,
    /// Shards of groups older than the window.
    pub too_old: u64,
    /// Shards that contradict their group (another shape, a length that does not fit).
    pub inconsistent: u64,
    /// Groups that left the window with datagrams never received nor rebuilt.
    pub lost_groups: u64,
    /// Their datagrams: data lost for good (of groups whose shape a parity shard told).
    pub lost_data: u64,
    /// Shards of those groups that never arrived, data and parity, needed or not.
    pub missing_shards: u64,
}

/// One group the decoder holds.
struct GroupSlot {
    group: u32,
    in_use: bool,
    /// From the first parity shard: data count, parity count, shard length.
    shape: Option<(usize, usize, usize)>,
    /// Data received or rebuilt (delivered), by index.
    have_data: u32,
    /// Data received, by index.
    got_data: u32,
    have_parity: u32,
    data_lens: [u16; MAX_DATA_SHARDS],
    /// `MAX_DATA_SHARDS` slots of `MAX_DATAGRAM`, then `MAX_PARITY_SHARDS` of `MAX_SHARD`.
    bytes: Vec<u8>,
    /// All of its data is in (or could not be): nothing more to do.
    done: bool,
}

impl GroupSlot {
    fn empty() -> Self {
        Self {
            group: 0,
            in_use: false,
            shape: None,
            have_data: 0,
            got_data: 0,
            have_parity: 0,
            data_lens: [0; MAX_DATA_SHARDS],
            bytes: Vec::new(),
            done: false,
        }
    }

    fn data(&self, i: usize) -> &[u8] {
        &self.bytes[i * MAX_DATAGRAM..][..usize::from(self.data_lens[i])]
    }

    fn parity_offset(i: usize) -> usize {
        MAX_DATA_SHARDS * MAX_DATAGRAM + i * MAX_SHARD
    }
}

/// The receiver's side: groups within the window, and the datagrams parity rebuilds.
pub struct FecDecoder {
    slots: Vec<GroupSlot>,
    /// The newest group seen.
    newest: Option<u32>,
    codecs: Codecs,
    /// A group's shards as the codec takes them, data then parity, `MAX_SHARD` apart.
    work: Vec<u8>,
    pub stats: FecStats,
}

impl Default for FecDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FecDecoder {
    pub fn new() -> Self {
        Self {
            slots: (0..DECODER_WINDOW).map(|_| GroupSlot::empty()).collect(),
            newest: None,
            codecs: Codecs::default(),
            work: Vec::new(),
            stats: FecStats::default(),
        }
    }

    /// A data datagram arrived (authenticated, not a replay): true if the caller delivers
    /// it (false: parity rebuilt it already, or its group is out of the window).
    pub fn handle_data(&mut self, tag: DataTag, datagram: &[u8], deliver: impl FnMut(&[u8])) -> bool {
        if datagram.len() > MAX_DATAGRAM || usize::from(tag.index) >= MAX_DATA_SHARDS {
            self.stats.inconsistent += 1;
            return false;
        }
        let Some(s) = self.slot_for(tag.group) else { return false };
        let slot = &mut self.slots[s];
        let bit = 1u32 << tag.index;
        if slot.have_data & bit != 0 {
            return false;
        }
        let i = usize::from(tag.index);
        slot.bytes[i * MAX_DATAGRAM..][..datagram.len()].copy_from_slice(datagram);
        slot.data_lens[i] = datagram.len() as u16;
        slot.have_data |= bit;
        slot.got_data |= bit;
        self.try_rebuild(s, deliver);
        true
    }

    /// A parity shard arrived (authenticated, not a replay): the datagrams of its group it
    /// lets us rebuild go to `deliver`, in index order.
    pub fn handle_parity(&mut self, h: ParityHeader, shard: &[u8], deliver: impl FnMut(&[u8])) {
        if shard.len() != usize::from(h.shard_len) {
            self.stats.inconsistent += 1;
            return;
        }
        let Some(s) = self.slot_for(h.group) else { return };
        let slot = &mut self.slots[s];
        let shape = (usize::from(h.data_count), usize::from(h.parity_count), usize::from(h.shard_len));
        if slot.shape.is_some_and(|known| known != shape) {
            self.stats.inconsistent += 1;
            return;
        }
        slot.shape = Some(shape);
        let bit = 1u32 << h.index;
        if slot.have_parity & bit == 0 {
            let at = GroupSlot::parity_offset(usize::from(h.index));
            slot.bytes[at..at + shard.len()].copy_from_slice(shard);
            slot.have_parity |= bit;
        }
        self.try_rebuild(s, deliver);
    }

    /// The slot of `group`, taken over from an older group if need be; `None` (counted)
    /// for a group older than the window.
    fn slot_for(&mut self, group: u32) -> Option<usize> {
        let newest = *self.newest.get_or_insert(group);
        // wrapping distance: a group "ahead" by less than half the space is newer
        let ahead = group.wrapping_sub(newest);
        if ahead < u32::MAX / 2 {
            self.newest = Some(group);
        } else if newest.wrapping_sub(group) >= DECODER_WINDOW {
            self.stats.too_old += 1;
            return None;
        }
        let s = (group % DECODER_WINDOW) as usize;
        let slot = &mut self.slots[s];
        if !slot.in_use || slot.group != group {
            if let Some((k, r, _)) = slot.shape.filter(|_| slot.in_use) {
                let mask = (1u32 << k) - 1;
                let lost = k as u32 - (slot.have_data & mask).count_ones();
                self.stats.lost_data += u64::from(lost);
                self.stats.lost_groups += u64::from(lost > 0);
                let got = (slot.got_data & mask).count_ones() + slot.have_parity.count_ones();
                self.stats.missing_shards += u64::from((k + r) as u32 - got);
            }
            if slot.bytes.is_empty() {
                slot.bytes = vec![0; MAX_DATA_SHARDS * MAX_DATAGRAM + MAX_PARITY_SHARDS * MAX_SHARD];
            }
            let bytes = std::mem::take(&mut slot.bytes);
            *slot = GroupSlot { group, in_use: true, bytes, ..GroupSlot::empty() };
        }
        Some(s)
    }

    /// Rebuilds slot `s`'s missing datagrams once any `data count` of its shards are in.
    fn try_rebuild(&mut self, s: usize, mut deliver: impl FnMut(&[u8])) {
        let slot = &mut self.slots[s];
        let Some((k, r, shard_len)) = slot.shape else { return };
        let data_mask = (1u32 << k) - 1;
        if slot.done {
            return;
        }
        if slot.have_data & data_mask == data_mask {
            slot.done = true;
            return;
        }
        let received = (slot.have_data & data_mask).count_ones() + slot.have_parity.count_ones();
        if (received as usize) < k {
            return;
        }
        // every datagram received must fit the shard length the parity says
        if (0..k).any(|i| slot.have_data & (1 << i) != 0 && usize::from(slot.data_lens[i]) + LEN_PREFIX > shard_len) {
            self.stats.inconsistent += 1;
            slot.done = true;
            return;
        }
        slot.done = true;
        let Ok(codec) = self.codecs.get(k, r) else {
            self.stats.inconsistent += 1;
            return;
        };
        if self.work.is_empty() {
            self.work = vec![0; (MAX_DATA_SHARDS + MAX_PARITY_SHARDS) * MAX_SHARD];
        }
        let mut present = [false; MAX_DATA_SHARDS + MAX_PARITY_SHARDS];
        for (i, shard) in self.work.chunks_exact_mut(MAX_SHARD).take(k + r).enumerate() {
            let shard = &mut shard[..shard_len];
            if i < k && slot.have_data & (1 << i) != 0 {
                let d = slot.data(i);
                shard[..LEN_PREFIX].copy_from_slice(&(d.len() as u16).to_be_bytes());
                shard[LEN_PREFIX..LEN_PREFIX + d.len()].copy_from_slice(d);
                shard[LEN_PREFIX + d.len()..].fill(0);
                present[i] = true;
            } else if i >= k && slot.have_parity & (1 << (i - k)) != 0 {
                let at = GroupSlot::parity_offset(i - k);
                shard.copy_from_slice(&slot.bytes[at..at + shard_len]);
                present[i] = true;
            }
        }
        let mut shards = self.work.chunks_exact_mut(MAX_SHARD);
        let mut views: [(&mut [u8], bool); MAX_DATA_SHARDS + MAX_PARITY_SHARDS] =
            std::array::from_fn(|i| (shards.next().map_or(&mut [][..], |s| &mut s[..shard_len]), present[i]));
        if codec.reconstruct_data(&mut views[..k + r]).is_err() {
            self.stats.inconsistent += 1;
            return;
        }
        let missing = !slot.have_data & data_mask;
        for (i, (restored, _)) in views.iter().enumerate().take(k).filter(|(i, _)| missing & (1 << i) != 0) {
            let len = usize::from(u16::from_be_bytes([restored[0], restored[1]]));
            match restored.get(LEN_PREFIX..LEN_PREFIX + len) {
                Some(d) if len <= MAX_DATAGRAM => {
                    slot.have_data |= 1 << i;
                    self.stats.recovered += 1;
                    deliver(d);
                }
                _ => self.stats.inconsistent += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(i: usize) -> Vec<u8> {
        (0..(i * 37) % 1400 + 1).map(|j| (i * 7 + j) as u8).collect()
    }

    /// One group of `k` datagrams and `r` parity shards: each datagram, as delivered when
    /// the receiver gets the data shards `keep_data` and the parity shards `keep_parity`.
    fn run(k: usize, r: usize, keep_data: &[usize], keep_parity: &[usize]) -> (Vec<Vec<u8>>, FecStats) {
        let mut enc = FecEncoder::new(7);
        let tags: Vec<DataTag> = (0..k).map(|i| enc.push(&datagram(i)).unwrap()).collect();
        let mut parity = vec![0u8; r * MAX_SHARD];
        let closed = enc.close(r, &mut parity).unwrap();
        let len = usize::from(closed.shard_len);
        let mut dec = FecDecoder::new();
        let mut got = Vec::new();
        for &i in keep_data {
            if dec.handle_data(tags[i], &datagram(i), |d| got.push(d.to_vec())) {
                got.push(datagram(i));
            }
        }
        for &i in keep_parity {
            dec.handle_parity(closed.header(i as u8), &parity[i * len..][..len], |d| got.push(d.to_vec()));
        }
        (got, dec.stats)
    }

    #[test]
    fn any_k_shards_rebuild_the_group_and_each_datagram_comes_once() {
        // 10 data, 4 parity: lose 4 data, keep 2 of them replaced by parity ... every mix
        let (k, r) = (10, 4);
        for lost in 0..=r {
            let keep_data: Vec<usize> = (lost..k).collect();
            let keep_parity: Vec<usize> = (0..lost).collect();
            let (mut got, stats) = run(k, r, &keep_data, &keep_parity);
            got.sort();
            let mut want: Vec<Vec<u8>> = (0..k).map(datagram).collect();
            want.sort();
            assert_eq!(got, want, "lost {lost}");
            assert_eq!(stats.recovered, lost as u64);
        }
        // one shard short: nothing rebuilt, nothing wrong delivered
        let (got, stats) = run(k, r, &(5..k).collect::<Vec<_>>(), &[0, 1, 2, 3]);
        assert_eq!(got.len(), 5);
        assert_eq!(stats.recovered, 0);
    }

    #[test]
    fn a_datagram_rebuilt_is_not_delivered_again_when_it_arrives_late() {
        let mut enc = FecEncoder::new(1);
        let tags: Vec<DataTag> = (0..3).map(|i| enc.push(&datagram(i)).unwrap()).collect();
        let mut parity = vec![0u8; MAX_SHARD];
        let closed = enc.close(1, &mut parity).unwrap();
        let len = usize::from(closed.shard_len);
        let mut dec = FecDecoder::new();
        let mut rebuilt = Vec::new();
        assert!(dec.handle_data(tags[0], &datagram(0), |_| {}));
        assert!(dec.handle_data(tags[1], &datagram(1), |_| {}));
        dec.handle_parity(closed.header(0), &parity[..len], |d| rebuilt.push(d.to_vec()));
        assert_eq!(rebuilt, vec![datagram(2)]);
        assert!(!dec.handle_data(tags[2], &datagram(2), |_| {}), "delivered twice");
    }

    #[test]
    fn hostile_headers_are_refused_and_memory_stays_bounded() {
        for bad in [
            [0, 0, 0, 1, 0, 0, 1, 0, 4],       // no data
            [0, 0, 0, 1, 0, 17, 1, 0, 4],      // too much data
            [0, 0, 0, 1, 2, 4, 2, 0, 4],       // index beyond its count
            [0, 0, 0, 1, 0, 4, 2, 0, 5],       // odd length
            [0, 0, 0, 1, 0, 4, 2, 0xff, 0xfe], // longer than any shard
        ] {
            assert_eq!(ParityHeader::parse(&bad), Err(FecError::BadField), "{bad:?}");
        }
        assert_eq!(ParityHeader::parse(&[0; 8]), Err(FecError::Truncated));
        assert_eq!(DataTag::parse(&[0, 0, 0, 0, 16]), Err(FecError::BadField));
        // shards for a thousand groups, with shapes that contradict each other
        let mut dec = FecDecoder::new();
        for g in 0..1000u32 {
            let h = ParityHeader { group: g, index: 0, data_count: 2, parity_count: 1, shard_len: 6 };
            dec.handle_parity(h, &[1, 2, 3, 4, 5, 6], |_| {});
            let other = ParityHeader { shard_len: 8, ..h };
            dec.handle_parity(other, &[0; 8], |_| {});
            dec.handle_data(DataTag { group: g, index: 1 }, &[0; 100], |_| {});
        }
        assert_eq!(dec.slots.len(), DECODER_WINDOW as usize);
        assert!(dec
            .slots
            .iter()
            .all(|s| s.bytes.len() <= MAX_DATA_SHARDS * MAX_DATAGRAM + MAX_PARITY_SHARDS * MAX_SHARD));
        assert!(dec.stats.inconsistent >= 1000);
        // a group far behind the window is dropped and counted
        dec.handle_data(DataTag { group: 3, index: 0 }, &[1], |_| {});
        assert!(dec.stats.too_old >= 1);
    }

    #[test]
    fn the_encoder_checks_what_it_is_given() {
        let mut enc = FecEncoder::new(0);
        assert_eq!(enc.close(2, &mut [0; 4096]), Err(FecError::EmptyGroup));
        assert_eq!(enc.push(&[0; MAX_DATAGRAM + 1]), Err(FecError::TooLarge));
        for _ in 0..MAX_DATA_SHARDS {
            enc.push(&[1, 2, 3]).unwrap();
        }
        assert_eq!(enc.push(&[1]), Err(FecError::GroupFull));
        assert_eq!(enc.close(0, &mut [0; 4096]), Err(FecError::BadField));
        assert_eq!(enc.close(2, &mut [0; 4]), Err(FecError::Truncated));
        let closed = enc.close(2, &mut [0; 4096]).unwrap();
        assert_eq!((closed.group, closed.data_count, closed.shard_len), (0, 16, 6));
        assert_eq!(enc.push(&[9]).unwrap(), DataTag { group: 1, index: 0 }, "the next group opens");
    }

    proptest::proptest! {
        /// Any k of a group's k + r shards rebuild it: every datagram exactly once.
        #[test]
        fn any_k_shards_suffice(k in 1usize..=MAX_DATA_SHARDS, r in 1usize..=MAX_PARITY_SHARDS, seed in 0u64..u64::MAX) {
            let order: Vec<usize> = {
                // a seeded shuffle of the k + r shards; the first k survive
                let mut v: Vec<usize> = (0..k + r).collect();
                let mut x = seed | 1;
                for i in (1..v.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    v.swap(i, (x % (i as u64 + 1)) as usize);
                }
                v
            };
            let kept = &order[..k];
            let keep_data: Vec<usize> = kept.iter().copied().filter(|&i| i < k).collect();
            let keep_parity: Vec<usize> = kept.iter().copied().filter(|&i| i >= k).map(|i| i - k).collect();
            let (mut got, _) = run(k, r, &keep_data, &keep_parity);
            got.sort();
            let mut want: Vec<Vec<u8>> = (0..k).map(datagram).collect();
            want.sort();
            proptest::prop_assert_eq!(got, want);
        }

        /// Shards with any header and any bytes never panic the decoder, and what it
        /// delivers is never longer than a datagram.
        #[test]
        fn hostile_shards_never_panic(ops in proptest::collection::vec(
            (0u32..40, proptest::prelude::any::<[u8; PARITY_HEADER_LEN]>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), proptest::prelude::any::<bool>()),
            1..60,
        )) {
            let mut dec = FecDecoder::new();
            for (group, mut header, bytes, parity) in ops {
                header[..4].copy_from_slice(&group.to_be_bytes());
                let mut ok = true;
                if parity {
                    if let Ok(h) = ParityHeader::parse(&header) {
                        let mut shard = bytes.clone();
                        shard.resize(usize::from(h.shard_len), 0);
                        dec.handle_parity(h, &shard, |d| ok &= d.len() <= MAX_DATAGRAM);
                    }
                } else if let Ok(tag) = DataTag::parse(&header) {
                    dec.handle_data(tag, &bytes, |d| ok &= d.len() <= MAX_DATAGRAM);
                }
                proptest::prop_assert!(ok);
            }
        }
    }
}
