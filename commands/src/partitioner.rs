//! Kafka's default key partitioner: murmur2 of the key bytes, as the Java client computes it.
//!
//! Single-writer processing relies on every producer, in every language, sending an
//! aggregate's commands to the same partition. The Java client is the reference, so this
//! module reproduces `org.apache.kafka.common.utils.Utils.murmur2` bit for bit; librdkafka's
//! default (`consistent_random`, CRC32) differs, hence the `murmur2_random` setting the wire
//! contract asks non-Java producers to use. The processor uses the same function to detect
//! commands that arrived on the wrong partition.

/// The seed Kafka's Java client uses (`0x9747b28c`).
const SEED: u32 = 0x9747_b28c;
/// The murmur2 multiplication constant.
const M: u32 = 0x5bd1_e995;
/// The murmur2 shift.
const R: u32 = 24;

/// Computes the 32-bit murmur2 hash of `data` exactly as Kafka's Java client does.
///
/// Java reads the key in little-endian 4-byte chunks and mixes a 1–3 byte tail with
/// fall-through, all in wrapping 32-bit arithmetic with logical shifts (`>>>`); the
/// unsigned arithmetic here is the same bit pattern, reinterpreted as `i32` at the end so
/// callers see the same (possibly negative) number Java returns.
///
/// Java's `byte[]` length is an `int`, so keys of 4 GiB or more cannot occur there; here the
/// length is truncated to 32 bits, which no Kafka message key can reach.
pub fn murmur2(data: &[u8]) -> i32 {
    // Truncation is intended (see above); Kafka caps messages far below 4 GiB.
    let length = data.len() as u32;
    let mut h = SEED ^ length;

    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }

    // Java's `switch (length % 4)` falls through from case 3 to case 1; each arm below is
    // the sum of the cases it would execute.
    match *chunks.remainder() {
        [a, b, c] => {
            h ^= u32::from(c) << 16;
            h ^= u32::from(b) << 8;
            h ^= u32::from(a);
            h = h.wrapping_mul(M);
        }
        [a, b] => {
            h ^= u32::from(b) << 8;
            h ^= u32::from(a);
            h = h.wrapping_mul(M);
        }
        [a] => {
            h ^= u32::from(a);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }

    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;

    // Reinterpret the bits, as Java's `int` holds them.
    h as i32
}

/// Clears the sign bit, as Kafka's `Utils.toPositive` does.
///
/// Kafka does not use `abs`: `abs(i32::MIN)` is still negative, and masking keeps the
/// distribution uniform.
pub const fn to_positive(n: i32) -> i32 {
    n & 0x7fff_ffff
}

/// The partition the Java client's default partitioner picks for a non-null `key` among
/// `partitions` partitions: `to_positive(murmur2(key)) % partitions`.
///
/// Returns `None` when `partitions` is not positive, since a topic always has at least one
/// partition and a zero count would otherwise divide by zero; callers usually hold the
/// count from topic metadata and can treat `None` as "metadata not loaded".
///
/// The result is in `0..partitions`.
pub fn partition_for_key(key: &[u8], partitions: i32) -> Option<i32> {
    if partitions <= 0 {
        return None;
    }
    Some(to_positive(murmur2(key)) % partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(key, murmur2, partition of 3, partition of 6, partition of 12)`, each produced by
    /// kafka-clients 4.1.1 (`Utils.murmur2`, `Utils.toPositive(h) % n`, and
    /// `BuiltInPartitioner.partitionForKey` for 12) on the key's UTF-8 bytes. `abc`, `21`,
    /// `foobar` and the three long strings are also the vectors of Kafka's own
    /// `UtilsTest.testMurmur2`; the short keys cover every tail length (0 to 3 bytes).
    const JAVA_VECTORS: &[(&str, i32, i32, i32, i32)] = &[
        ("", 275_646_681, 0, 3, 9),
        ("a", -1_563_381_124, 1, 4, 4),
        ("ab", 316_155_434, 2, 2, 2),
        ("abc", 479_470_107, 0, 3, 3),
        ("abcd", -1_323_649_548, 2, 2, 8),
        ("abcde", 461_995_741, 1, 1, 1),
        ("21", -973_932_308, 0, 0, 0),
        ("foobar", -790_332_482, 0, 0, 6),
        ("a-little-bit-long-string", -985_981_536, 2, 2, 8),
        ("a-little-bit-longer-string", -1_486_304_829, 2, 5, 11),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
            2,
            5,
            5,
        ),
        ("acc-1", -588_832_667, 0, 3, 9),
        ("acc-2", 1_186_753_268, 2, 2, 8),
        ("acc-42", -745_712_515, 1, 1, 1),
        ("room-42", 743_646_974, 2, 2, 2),
        ("room-101", -722_795_594, 0, 0, 6),
        ("zürich", 1_564_393_856, 2, 2, 8),
        ("€uro", -1_348_700_560, 1, 4, 4),
        ("日本語", 1_431_860_170, 1, 4, 10),
        ("🦀", 1_309_741_855, 1, 1, 7),
    ];

    #[test]
    fn murmur2_matches_the_java_client() {
        for &(key, hash, ..) in JAVA_VECTORS {
            assert_eq!(murmur2(key.as_bytes()), hash, "murmur2({key:?})");
        }
    }

    #[test]
    fn partitions_match_the_java_client() {
        for &(key, _, p3, p6, p12) in JAVA_VECTORS {
            let key_bytes = key.as_bytes();
            assert_eq!(partition_for_key(key_bytes, 3), Some(p3), "{key:?} of 3");
            assert_eq!(partition_for_key(key_bytes, 6), Some(p6), "{key:?} of 6");
            assert_eq!(partition_for_key(key_bytes, 12), Some(p12), "{key:?} of 12");
        }
    }

    #[test]
    fn bytes_with_the_high_bit_set_are_unsigned() {
        // Java masks each signed byte with `& 0xff`; a sign-extension slip would change this.
        let raw = [0xff, 0x80, 0x7f];
        assert_eq!(murmur2(&raw), 968_261_134);
        assert_eq!(partition_for_key(&raw, 12), Some(10));
    }

    #[test]
    fn to_positive_clears_only_the_sign_bit() {
        assert_eq!(to_positive(i32::MIN), 0);
        assert_eq!(to_positive(-1), i32::MAX);
        assert_eq!(to_positive(42), 42);
    }

    #[test]
    fn non_positive_partition_counts_have_no_partition() {
        assert_eq!(partition_for_key(b"acc-1", 0), None);
        assert_eq!(partition_for_key(b"acc-1", -3), None);
        assert_eq!(partition_for_key(b"acc-1", 1), Some(0));
    }

    #[test]
    fn partition_is_always_in_range() {
        for n in 1..=64 {
            for i in 0..200 {
                let key = format!("key-{i}");
                let p = partition_for_key(key.as_bytes(), n).expect("positive count");
                assert!((0..n).contains(&p), "{key} of {n} gave {p}");
            }
        }
    }
}
