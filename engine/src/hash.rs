//! Row fingerprints: the snapshot stores one per delivered key, so a changed hash means the
//! row must be sent again.

/// blake3 of the row's canonical bytes (the extension passes jsonb's canonical text, whose key
/// order is deterministic, so equal rows hash equally).
pub fn row_hash(canonical: &[u8]) -> [u8; 32] {
    *blake3::hash(canonical).as_bytes()
}


/// A hint to load the cache line holding `value`; nothing else (and nothing at all on
/// processors other than x86_64).
#[inline(always)]
fn prefetch_read<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint without effect on memory; the pointer is a valid reference.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((value as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Fingerprints of version 4 (syncs created since 0.8.0): 24 bytes, a 128-bit identity of the
/// row's key followed by a 64-bit hash of its mapped fields. The planner keeps only these in
/// memory to diff a whole model against the snapshot in one pass (the key identity finds the
/// snapshot row, the field hash says whether it changed); the snapshot keeps them in its
/// `hash` column. Both halves are xxh3 over self-delimiting parts (a tag byte, the length, the
/// bytes), so that ("ab", "c") and ("a", "bc") differ.
pub const FINGERPRINT_LEN: usize = 24;

/// What a part of a fingerprint is. Key parts are the values' text, tagged by their JSON kind,
/// so that a key keeps its identity when its column is widened (int to bigint) as it keeps its
/// jsonb form. Field parts are tagged by the kind of bytes they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Part {
    Null = b'0',
    KeyNumber = b'n',
    KeyText = b's',
    /// Integers of any width, as 8 little-endian bytes.
    Integer = b'i',
    Bool = b'b',
    Date = b'd',
    Timestamp = b'T',
    TimestampTz = b'Z',
    Float4 = b'f',
    Float8 = b'F',
    Uuid = b'u',
    /// text, varchar, char.
    String = b'S',
    Bytea = b'x',
    /// numeric's varlena body, 16-bit units in little-endian order.
    Numeric = b'N',
    /// jsonb's binary body (little-endian machines only: elsewhere jsonb goes by its text).
    Jsonb = b'j',
    /// The value's output text (every other type).
    Text = b't',
}

/// The bytes one row's fingerprint is computed from, gathered part by part; reused from row
/// to row so that hashing a model allocates nothing per row.
#[derive(Default)]
pub struct FingerprintInput {
    key: Vec<u8>,
    fields: Vec<u8>,
}

fn push_part(buf: &mut Vec<u8>, part: Part, bytes: &[u8]) {
    buf.push(part as u8);
    if part != Part::Null {
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(bytes);
    }
}

impl FingerprintInput {
    pub fn clear(&mut self) {
        self.key.clear();
        self.fields.clear();
    }

    pub fn key(&mut self, part: Part, bytes: &[u8]) {
        push_part(&mut self.key, part, bytes);
    }

    pub fn field(&mut self, part: Part, bytes: &[u8]) {
        push_part(&mut self.fields, part, bytes);
    }

    /// The fingerprint: key identity, then the fields' hash seeded by [`fingerprint_seed`].
    pub fn finish(&self, seed: u64) -> [u8; FINGERPRINT_LEN] {
        let mut out = [0u8; FINGERPRINT_LEN];
        out[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(&self.key).to_le_bytes());
        out[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_64_with_seed(&self.fields, seed).to_le_bytes());
        out
    }
}

/// `n` in decimal, as Postgres's `int8out` writes it: an integer key's part of a fingerprint
/// (core::fmt's machinery was 2% of a plan).
pub fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// The seed of a sync's field hashes: a hash of its field names (a renamed destination field
/// or model column changes every row's hash, so every row is sent under its new name).
pub fn fingerprint_seed(signature: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(signature.as_bytes())
}

/// A fingerprint split into its key identity and field hash; None if it is not one of
/// version 4 (a stored hash of the wrong length).
pub fn split_fingerprint(fingerprint: &[u8]) -> Option<(u128, u64)> {
    if fingerprint.len() != FINGERPRINT_LEN {
        return None;
    }
    let key = u128::from_le_bytes(fingerprint[..16].try_into().ok()?);
    let fields = u64::from_le_bytes(fingerprint[16..].try_into().ok()?);
    Some((key, fields))
}

/// A snapshot's fingerprints in memory, for the one-pass plan: found by key identity, each
/// marked once its row is seen in the model (the rest are gone from it). Sorted by the
/// identity's top bits and bucketed by them, about 16 entries a bucket (identities are
/// uniform): the bucket offsets (4 bytes per 16 rows) and the seen marks (a bit a row) stay in
/// the processor's cache, so a probe costs about one miss, in the entries, where one bucket per
/// entry cost two (the probes were a third of a zero-change plan). A probe starts at the entry
/// its identity's bits predict, and the plan prefetches that entry some rows ahead, so that
/// the one miss left overlaps with other work. 24 bytes a row in all.
pub struct FingerprintIndex {
    /// (key identity high half, low half, field hash), sorted by the high half.
    entries: Vec<[u64; 3]>,
    /// entries[starts[b]..starts[b + 1]] is bucket b.
    starts: Vec<u32>,
    bits: u32,
    /// One bit per entry.
    seen: Vec<u64>,
}

impl FingerprintIndex {
    /// From (key identity, field hash) pairs.
    pub fn new(pairs: Vec<(u128, u64)>) -> Self {
        Self::from_chunks(vec![pairs.into_iter().map(|(key, fields)| Self::entry(key, fields)).collect()])
    }

    /// An entry of the index: what [`FingerprintIndex::from_chunks`] takes.
    pub fn entry(key: u128, fields: u64) -> [u64; 3] {
        [(key >> 64) as u64, key as u64, fields]
    }

    /// From chunks of entries, as a reader fetches them: each chunk is freed once copied into
    /// the index (24 bytes a row, allocated once), so that building the index of 10M rows holds
    /// little more than twice its 240 MB at any time.
    pub fn from_chunks(chunks: Vec<Vec<[u64; 3]>>) -> Self {
        let len: usize = chunks.iter().map(Vec::len).sum();
        // About 16 entries a bucket, fewer than 2^32 entries (u32 offsets).
        let bits = (usize::BITS - 1 - len.max(1).leading_zeros()).saturating_sub(4);
        let mut starts = vec![0u32; (1usize << bits) + 1];
        for e in chunks.iter().flatten() {
            starts[Self::bucket(e[0], bits) + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        // Each entry goes straight to its bucket, and only the buckets are sorted: a sort of
        // the whole was a fifth of loading a snapshot.
        let mut entries = vec![[0u64; 3]; len];
        let mut next: Vec<u32> = starts[..starts.len() - 1].to_vec();
        for chunk in chunks {
            for e in chunk {
                let b = Self::bucket(e[0], bits);
                entries[next[b] as usize] = e;
                next[b] += 1;
            }
        }
        for b in 0..starts.len() - 1 {
            entries[starts[b] as usize..starts[b + 1] as usize].sort_unstable_by_key(|e| e[0]);
        }
        let seen = vec![0u64; len.div_ceil(64)];
        FingerprintIndex { entries, starts, bits, seen }
    }

    fn bucket(high: u64, bits: u32) -> usize {
        if bits == 0 { 0 } else { (high >> (64 - bits)) as usize }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of this key identity. Within a bucket, entries are sorted and their high
    /// halves uniform, so the search starts where the identity would sit if they were evenly
    /// spread ([`FingerprintIndex::guess`]): usually at the entry or beside it, one cache line
    /// where a scan from the bucket's start touched three or four.
    pub fn find(&self, key: u128) -> Option<usize> {
        let (high, low) = ((key >> 64) as u64, key as u64);
        let (start, end, guess) = self.guess(high);
        if start == end {
            return None;
        }
        // The first entry whose high half is not below `high`.
        let mut i = guess;
        if self.entries[i][0] < high {
            while i < end && self.entries[i][0] < high {
                i += 1;
            }
        } else {
            while i > start && self.entries[i - 1][0] >= high {
                i -= 1;
            }
        }
        while i < end && self.entries[i][0] == high {
            if self.entries[i][1] == low {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// Bucket of `high` (entries[start..end]) and the entry in it where `high` would sit if
    /// the bucket's entries were evenly spread.
    fn guess(&self, high: u64) -> (usize, usize, usize) {
        let b = Self::bucket(high, self.bits);
        let (start, end) = (self.starts[b] as usize, self.starts[b + 1] as usize);
        // The bits of `high` below the bucket's, as a fraction of the bucket's width.
        let within = if self.bits == 0 { high } else { high << self.bits };
        let offset = ((within as u128 * (end - start) as u128) >> 64) as usize;
        (start, end, start + offset.min((end - start).saturating_sub(1)))
    }

    /// Asks the processor to fetch the entry where [`FingerprintIndex::find`] will start
    /// looking for `key`: a plan calls it some rows ahead, so that the probes' cache misses
    /// (the index is larger than the caches, and probed in random order) overlap with the
    /// work on the rows in between instead of stalling each probe.
    pub fn prefetch(&self, key: u128) {
        // (The bucket's offsets, which this reads, were prefetched further ahead by
        // prefetch_bucket.)
        let (start, end, guess) = self.guess((key >> 64) as u64);
        if start < end {
            prefetch_read(&self.entries[guess]);
        }
    }

    /// Asks the processor to fetch the offsets of `key`'s bucket, which
    /// [`FingerprintIndex::prefetch`] reads: called further ahead than it.
    pub fn prefetch_bucket(&self, key: u128) {
        prefetch_read(&self.starts[Self::bucket((key >> 64) as u64, self.bits)]);
    }

    pub fn fields(&self, i: usize) -> u64 {
        self.entries[i][2]
    }

    pub fn is_seen(&self, i: usize) -> bool {
        self.seen[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn set_seen(&mut self, i: usize) {
        self.seen[i / 64] |= 1 << (i % 64);
    }

    /// The entries not marked seen.
    pub fn unseen(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.entries.len()).filter(|&i| !self.is_seen(i))
    }

    /// Entry i's fingerprint, as stored.
    pub fn fingerprint(&self, i: usize) -> [u8; FINGERPRINT_LEN] {
        let [high, low, fields] = self.entries[i];
        let mut out = [0u8; FINGERPRINT_LEN];
        out[..16].copy_from_slice(&(((high as u128) << 64) | low as u128).to_le_bytes());
        out[16..].copy_from_slice(&fields.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_index_finds_every_entry_and_nothing_else() {
        for n in [0usize, 1, 2, 3, 1000, 4097] {
            let fingerprints: Vec<[u8; FINGERPRINT_LEN]> = (0..n)
                .map(|i| {
                    let mut input = FingerprintInput::default();
                    input.key(Part::KeyNumber, i.to_string().as_bytes());
                    input.field(Part::Integer, &(i as i64 * 7).to_le_bytes());
                    input.finish(1)
                })
                .collect();
            let mut index = FingerprintIndex::new(fingerprints.iter().map(|f| split_fingerprint(f).unwrap()).collect());
            assert_eq!(index.len(), n);
            for f in &fingerprints {
                let (key, fields) = split_fingerprint(f).unwrap();
                let i = index.find(key).unwrap_or_else(|| panic!("n = {n}: an entry is missing"));
                assert_eq!(index.fields(i), fields);
                assert_eq!(&index.fingerprint(i), f, "stored bytes come back");
                // Identities that share the high half (the bucket) but not the low are apart.
                assert_eq!(index.find(key ^ 1), None);
            }
            assert_eq!(index.find(u128::MAX), None);
            assert_eq!(index.find(0), None);
            // Marked entries leave the unseen ones.
            for f in fingerprints.iter().step_by(2) {
                let i = index.find(split_fingerprint(f).unwrap().0).unwrap();
                assert!(!index.is_seen(i));
                index.set_seen(i);
            }
            let mut unseen: Vec<[u8; FINGERPRINT_LEN]> = index.unseen().map(|i| index.fingerprint(i)).collect();
            unseen.sort();
            let mut expected: Vec<[u8; FINGERPRINT_LEN]> = fingerprints.iter().skip(1).step_by(2).copied().collect();
            expected.sort();
            assert_eq!(unseen, expected, "n = {n}");
        }
    }

    #[test]
    fn decimal_writes_integers_as_int8out_does() {
        for n in [0i64, 7, -7, 10, 1_000_000, i64::MAX, i64::MIN, -1_234_567_890_123] {
            let mut buf = [0u8; 20];
            assert_eq!(std::str::from_utf8(decimal(n, &mut buf)).unwrap(), n.to_string());
        }
    }

    #[test]
    fn the_fingerprint_index_finds_entries_however_they_are_spread() {
        // The search starts at a guess that assumes uniform identities: it must still find
        // every entry, and nothing else, when they are not (clustered in one bucket, sharing
        // high halves, at the extremes), and whatever the guess, for every bucket size.
        let shapes: Vec<Vec<u128>> = vec![
            (0..1000u128).collect(),
            (0..1000u128).map(|i| i << 64).collect(),
            (0..1000u128).map(|i| (7u128 << 64) | i).collect(),
            (0..1000u128).map(|i| u128::MAX - i * 3).collect(),
            (0..1000u128).map(|i| ((i % 10) << 120) | ((i / 10) << 64) | (i % 3)).collect(),
        ];
        for keys in shapes {
            let index = FingerprintIndex::new(keys.iter().map(|&k| (k, k as u64 ^ 5)).collect());
            let present: std::collections::HashSet<u128> = keys.iter().copied().collect();
            for &k in &keys {
                let i = index.find(k).unwrap_or_else(|| panic!("{k:#x} is missing"));
                assert_eq!(index.fields(i), k as u64 ^ 5);
                index.prefetch_bucket(k);
                index.prefetch(k);
                for probe in [k.wrapping_add(1), k.wrapping_sub(1), k ^ (1 << 64), k ^ (1 << 127)] {
                    assert_eq!(index.find(probe).is_some(), present.contains(&probe), "{probe:#x}");
                }
            }
        }
    }

    fn fingerprint(key: &[(Part, &[u8])], fields: &[(Part, &[u8])], seed: u64) -> [u8; FINGERPRINT_LEN] {
        let mut input = FingerprintInput::default();
        key.iter().for_each(|(p, b)| input.key(*p, b));
        fields.iter().for_each(|(p, b)| input.field(*p, b));
        input.finish(seed)
    }

    #[test]
    fn fingerprint_parts_are_delimited_and_tagged() {
        let seed = fingerprint_seed("v4:id,name");
        let base = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], seed);
        assert_eq!(base, fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], seed));
        // Moving a byte between fields, or a NULL against an empty string, is a change.
        assert_ne!(base, fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"a"), (Part::String, b"bc")], seed));
        let null = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::Null, b""), (Part::String, b"c")], seed);
        let empty = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b""), (Part::String, b"c")], seed);
        assert_ne!(null, empty);
        // The same bytes of another kind (a string "1" against the number 1) are another key.
        let text_key = fingerprint(&[(Part::KeyText, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], seed);
        assert_ne!(base[..16], text_key[..16]);
        assert_eq!(base[16..], text_key[16..], "the field hash does not depend on the key");
        // Another signature (a renamed field) changes the field hash, not the key identity.
        let renamed = fingerprint(&[(Part::KeyNumber, b"1")], &[(Part::String, b"ab"), (Part::String, b"c")], fingerprint_seed("v4:id,title"));
        assert_eq!(base[..16], renamed[..16]);
        assert_ne!(base[16..], renamed[16..]);
        let (key, fields) = split_fingerprint(&base).unwrap();
        assert_eq!(key.to_le_bytes(), base[..16]);
        assert_eq!(fields.to_le_bytes(), base[16..]);
        assert_eq!(split_fingerprint(&base[..20]), None);
    }

    #[test]
    fn matches_blake3_reference_vector() {
        // Official blake3 test vector for the empty input.
        let empty = row_hash(b"");
        assert_eq!(
            blake3::Hash::from(empty).to_hex().as_str(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn distinguishes_rows() {
        assert_eq!(row_hash(br#"{"id": 1}"#), row_hash(br#"{"id": 1}"#));
        assert_ne!(row_hash(br#"{"id": 1}"#), row_hash(br#"{"id": 2}"#));
    }
}
