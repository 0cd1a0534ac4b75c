//! The slot → shard table: versioned, validated, serialised as human-editable TOML.
//!
//! The file a DBA reads and edits:
//!
//! ```toml
//! version = 3
//! slots = 4096
//! shards = 2
//! weights = [1, 1]    # optional (default 1 each); used only when planning placement
//!
//! ranges = [
//!   { lo = 0, hi = 2047, shard = 0 },
//!   { lo = 2048, hi = 4095, shard = 1 },
//! ]
//! ```
//!
//! `[[ranges]]` tables (`lo = 0` / `hi = 2047` / `shard = 0` on separate lines) are
//! accepted as well; [`ShardMap::to_toml`] writes one line per range, the maximal runs in
//! slot order, so the same map always gives the same bytes. Ranges are inclusive, may come
//! in any order and must cover every slot exactly once; errors name the offending entry
//! by position, line and values.

use std::fmt;
use std::fmt::Write as _;

use serde::Deserialize;

use crate::hash::slot_of;
use crate::key::KeyValue;

/// The default number of slots.
pub const DEFAULT_SLOTS: u32 = 4096;
/// The largest number of slots a map may have (the table is 4 bytes a slot).
pub const MAX_SLOTS: u32 = 1 << 20;
/// The largest number of shards a map may have.
pub const MAX_SHARDS: u32 = 4096;
/// The largest sum of shard weights (each weight unit is a block of virtual nodes on the
/// placement ring, so this bounds planning work).
pub const MAX_TOTAL_WEIGHT: u64 = 4096;

/// A shard as placement sees it: its relative capacity. Weight 0 means "present but
/// drained": the shard keeps its index (config addresses shards by position) but the
/// ring gives it no slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardSpec {
    pub weight: u32,
}

impl Default for ShardSpec {
    fn default() -> ShardSpec {
        ShardSpec { weight: 1 }
    }
}

/// An inclusive run of slots owned by one shard: `lo-hi shardN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotRange {
    pub lo: u32,
    pub hi: u32,
    pub shard: u32,
}

impl SlotRange {
    /// Number of slots in the range (0 if `hi < lo`, which validation rejects).
    pub fn len(&self) -> u32 {
        if self.hi < self.lo {
            0
        } else {
            self.hi - self.lo + 1
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for SlotRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{} shard{}", self.lo, self.hi, self.shard)
    }
}

/// Where a range came from, for error messages: its position in the file's `ranges`
/// list, its line (when parsed from text) and its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRef {
    /// 0-based position in the `ranges` list.
    pub index: usize,
    /// 1-based line in the TOML text, when the map was parsed from text.
    pub line: Option<usize>,
    pub range: SlotRange,
}

impl fmt::Display for RangeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ranges[{}]", self.index)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        write!(
            f,
            " {{ lo = {}, hi = {}, shard = {} }}",
            self.range.lo, self.range.hi, self.range.shard
        )
    }
}

/// Why a shard map is not valid. Every variant names what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("shard map: {0}")]
    Syntax(String),
    #[error("slots = {0}: must be a power of two between 1 and {MAX_SLOTS}")]
    BadSlots(u64),
    #[error("shards = {0}: must be between 1 and {MAX_SHARDS}")]
    BadShardCount(u64),
    #[error("version = {0}: must be at most {max} (a TOML integer)", max = i64::MAX)]
    BadVersion(u64),
    #[error("weights has {got} entries but shards = {shards}")]
    WeightsLength { got: usize, shards: u32 },
    #[error("weights: at least one shard needs a weight above 0, and their sum may be at most {MAX_TOTAL_WEIGHT} (got {sum})")]
    BadWeights { sum: u64 },
    #[error("{0}: hi is below lo")]
    Inverted(RangeRef),
    #[error("{range}: outside the slots 0-{last}")]
    OutOfBounds { range: RangeRef, last: u32 },
    #[error("{range}: shard {shard} does not exist (shards = {shards}, so 0-{last})", shard = .range.range.shard, last = .shards.saturating_sub(1))]
    UnknownShard { range: RangeRef, shards: u32 },
    #[error("{second} overlaps {first}: slots {lo}-{hi} are owned twice")]
    Overlap {
        first: RangeRef,
        second: RangeRef,
        lo: u32,
        hi: u32,
    },
    #[error("slots {lo}-{hi} are owned by no shard ({where_})")]
    Gap { lo: u32, hi: u32, where_: String },
    #[error("the table has {got} slots but slots = {slots}")]
    TableLength { got: usize, slots: u32 },
    #[error("slot {slot} is owned by shard {shard}, which does not exist (shards = {shards})")]
    TableShard { slot: u32, shard: u32, shards: u32 },
}

/// One immutable version of the slot → shard table.
///
/// Invariants (checked by every constructor, so a `ShardMap` value is always valid):
/// `slots` is a power of two, every slot is owned by exactly one shard, every owner is
/// below `shards`, and the weights (one per shard) are usable for placement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardMap {
    version: u64,
    slots: u32,
    weights: Vec<u32>,
    /// `table[slot]` = owning shard: the lookup is one array index.
    table: Box<[u32]>,
}

impl ShardMap {
    /// Builds a map from an explicit per-slot table.
    pub fn from_table(
        version: u64,
        weights: Vec<u32>,
        table: Vec<u32>,
    ) -> Result<ShardMap, MapError> {
        let slots = check_slots(table.len() as u64)?;
        let shards = check_header(version, weights.len() as u64, &weights)?;
        if let Some((slot, &shard)) = table.iter().enumerate().find(|(_, &s)| s >= shards) {
            return Err(MapError::TableShard {
                slot: slot as u32,
                shard,
                shards,
            });
        }
        debug_assert_eq!(table.len(), slots as usize);
        Ok(ShardMap {
            version,
            slots,
            weights,
            table: table.into_boxed_slice(),
        })
    }

    /// Builds a map from ranges (in any order) that must cover every slot exactly once.
    pub fn from_ranges(
        version: u64,
        slots: u32,
        weights: Vec<u32>,
        ranges: &[SlotRange],
    ) -> Result<ShardMap, MapError> {
        let refs: Vec<RangeRef> = ranges
            .iter()
            .enumerate()
            .map(|(index, &range)| RangeRef {
                index,
                line: None,
                range,
            })
            .collect();
        Self::from_range_refs(version, u64::from(slots), weights, &refs)
    }

    fn from_range_refs(
        version: u64,
        slots: u64,
        weights: Vec<u32>,
        ranges: &[RangeRef],
    ) -> Result<ShardMap, MapError> {
        let slots = check_slots(slots)?;
        let shards = check_header(version, weights.len() as u64, &weights)?;
        let last = slots - 1;
        for r in ranges {
            if r.range.hi < r.range.lo {
                return Err(MapError::Inverted(r.clone()));
            }
            if r.range.hi > last {
                return Err(MapError::OutOfBounds {
                    range: r.clone(),
                    last,
                });
            }
            if r.range.shard >= shards {
                return Err(MapError::UnknownShard {
                    range: r.clone(),
                    shards,
                });
            }
        }
        // Sorted by lo, the ranges must tile 0..=last: each starts right after the previous.
        let mut sorted: Vec<&RangeRef> = ranges.iter().collect();
        sorted.sort_by_key(|r| (r.range.lo, r.range.hi, r.index));
        let mut next: u32 = 0; // first slot not yet covered
        let mut prev: Option<&RangeRef> = None;
        for r in &sorted {
            if r.range.lo > next {
                return Err(MapError::Gap {
                    lo: next,
                    hi: r.range.lo - 1,
                    where_: gap_place(prev, Some(r)),
                });
            }
            if let Some(p) = prev {
                if r.range.lo <= p.range.hi {
                    let (first, second) = if p.index <= r.index { (p, *r) } else { (*r, p) };
                    return Err(MapError::Overlap {
                        first: first.clone(),
                        second: second.clone(),
                        lo: r.range.lo,
                        hi: r.range.hi.min(p.range.hi),
                    });
                }
            }
            next = r.range.hi.saturating_add(1);
            prev = Some(r);
        }
        if prev.map_or(true, |p| p.range.hi < last) {
            return Err(MapError::Gap {
                lo: next,
                hi: last,
                where_: gap_place(prev, None),
            });
        }
        let mut table = vec![0u32; slots as usize];
        for r in ranges {
            table[r.range.lo as usize..=r.range.hi as usize].fill(r.range.shard);
        }
        Ok(ShardMap {
            version,
            slots,
            weights,
            table: table.into_boxed_slice(),
        })
    }

    /// An even map: shard `i` owns one contiguous block of slots whose size is
    /// proportional to its weight (largest-remainder rounding). Version 1.
    ///
    /// The alternative to [`ShardMap::initial`] (ring placement): exact balance and one
    /// range per shard, at the price that the map is not the ring's, so a later
    /// add/remove plan takes a ring-chosen (random-looking) set of slots from each shard.
    pub fn initial_contiguous(shards: &[ShardSpec], slots: u32) -> Result<ShardMap, MapError> {
        let weights: Vec<u32> = shards.iter().map(|s| s.weight).collect();
        check_layout(slots, &weights)?;
        let counts = proportional_counts(&weights, slots);
        let mut table = Vec::with_capacity(slots as usize);
        for (shard, &n) in counts.iter().enumerate() {
            table.extend(std::iter::repeat(shard as u32).take(n as usize));
        }
        ShardMap::from_table(1, weights, table)
    }

    /// The map's version: every published change gets a higher one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of slots (a power of two).
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Number of shards (indices `0..shards()`), including drained ones.
    pub fn shards(&self) -> u32 {
        self.weights.len() as u32
    }

    /// Placement weight of each shard.
    pub fn weights(&self) -> &[u32] {
        &self.weights
    }

    /// The owner of every slot, indexed by slot.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The shard owning `slot`.
    ///
    /// # Panics
    /// If `slot >= self.slots()`; slots computed by [`ShardMap::slot_of_key`] always fit.
    #[inline]
    pub fn shard_of_slot(&self, slot: u32) -> u32 {
        self.table[slot as usize]
    }

    /// The shard owning `slot`, or `None` if there is no such slot.
    #[inline]
    pub fn get(&self, slot: u32) -> Option<u32> {
        self.table.get(slot as usize).copied()
    }

    /// The slot of a key under this map's slot count.
    #[inline]
    pub fn slot_of_key(&self, key: &KeyValue) -> u32 {
        slot_of(key, self.slots)
    }

    /// The shard owning a key.
    #[inline]
    pub fn shard_of_key(&self, key: &KeyValue) -> u32 {
        // slot_of masks with slots - 1, so the index is always in bounds.
        self.table[slot_of(key, self.slots) as usize]
    }

    /// The table as maximal runs of slots with one owner, in slot order.
    pub fn ranges(&self) -> Vec<SlotRange> {
        let mut out: Vec<SlotRange> = Vec::new();
        for (slot, &shard) in self.table.iter().enumerate() {
            let slot = slot as u32;
            match out.last_mut() {
                Some(r) if r.shard == shard => r.hi = slot,
                _ => out.push(SlotRange {
                    lo: slot,
                    hi: slot,
                    shard,
                }),
            }
        }
        out
    }

    /// The ranges owned by one shard, in slot order.
    pub fn ranges_of(&self, shard: u32) -> Vec<SlotRange> {
        self.ranges()
            .into_iter()
            .filter(|r| r.shard == shard)
            .collect()
    }

    /// Slots owned per shard, indexed by shard.
    pub fn slot_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.weights.len()];
        for &s in self.table.iter() {
            counts[s as usize] += 1;
        }
        counts
    }

    /// The same table under another version number (e.g. to publish an edited file).
    pub fn with_version(&self, version: u64) -> Result<ShardMap, MapError> {
        check_header(version, self.weights.len() as u64, &self.weights)?;
        Ok(ShardMap {
            version,
            ..self.clone()
        })
    }

    /// Parses and validates a map from its TOML text. Errors name the offending range
    /// (position in `ranges`, line and values) or key.
    pub fn from_toml(text: &str) -> Result<ShardMap, MapError> {
        let file: MapFile =
            toml::from_str(text).map_err(|e| MapError::Syntax(toml_error(text, &e)))?;
        if file.shards == 0 || file.shards > u64::from(MAX_SHARDS) {
            return Err(MapError::BadShardCount(file.shards));
        }
        let shards = file.shards as u32;
        let weights = match file.weights {
            Some(w) if w.len() != shards as usize => {
                return Err(MapError::WeightsLength {
                    got: w.len(),
                    shards,
                });
            }
            Some(w) => w,
            None => vec![1; shards as usize],
        };
        let refs: Vec<RangeRef> = file
            .ranges
            .into_iter()
            .enumerate()
            .map(|(index, spanned)| {
                let line = line_of(text, spanned.span().start);
                let r = spanned.into_inner();
                RangeRef {
                    index,
                    line: Some(line),
                    range: SlotRange {
                        lo: r.lo,
                        hi: r.hi,
                        shard: r.shard,
                    },
                }
            })
            .collect();
        Self::from_range_refs(file.version, file.slots, weights, &refs)
    }

    /// The map as TOML: the same map always gives the same bytes (ranges are the maximal
    /// runs in slot order, one per line), so files diff and review cleanly.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# shardgate shard map: which shard owns each slot.\n\
             # slot(key) = Postgres's PARTITION BY HASH remainder of the key with modulus `slots`.\n\
             # Every slot 0..slots-1 must be in exactly one range; lo and hi are inclusive.\n\
             # weights (one per shard) steer placement only (add/remove-shard plans).\n",
        );
        // Writing to a String cannot fail.
        let _ = writeln!(out, "version = {}", self.version);
        let _ = writeln!(out, "slots = {}", self.slots);
        let _ = writeln!(out, "shards = {}", self.shards());
        let weights: Vec<String> = self.weights.iter().map(u32::to_string).collect();
        let _ = writeln!(out, "weights = [{}]", weights.join(", "));
        out.push_str("\nranges = [\n");
        for r in self.ranges() {
            let _ = writeln!(
                out,
                "  {{ lo = {}, hi = {}, shard = {} }},",
                r.lo, r.hi, r.shard
            );
        }
        out.push_str("]\n");
        out
    }

    /// A human summary for `shardgate shardmap show`: per shard, its slot count, share
    /// and ranges.
    pub fn show_table(&self) -> String {
        let counts = self.slot_counts();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "shard map version {}: {} slots on {} shard{}",
            self.version,
            self.slots,
            self.shards(),
            if self.shards() == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "{:>5}  {:>6}  {:>7}  {:>6}  {:>6}",
            "shard", "weight", "slots", "share", "ranges"
        );
        let ranges = self.ranges();
        for shard in 0..self.shards() {
            let mine: Vec<&SlotRange> = ranges.iter().filter(|r| r.shard == shard).collect();
            let _ = writeln!(
                out,
                "{:>5}  {:>6}  {:>7}  {:>5.1}%  {:>6}",
                shard,
                self.weights[shard as usize],
                counts[shard as usize],
                100.0 * f64::from(counts[shard as usize]) / f64::from(self.slots),
                mine.len()
            );
        }
        for shard in 0..self.shards() {
            let _ = writeln!(out, "\nshard {shard}:");
            let mut line = String::from(" ");
            let mut any = false;
            for r in ranges.iter().filter(|r| r.shard == shard) {
                any = true;
                let item = if r.lo == r.hi {
                    format!(" {}", r.lo)
                } else {
                    format!(" {}-{}", r.lo, r.hi)
                };
                if line.len() + item.len() > 88 {
                    let _ = writeln!(out, "{line}");
                    line = String::from(" ");
                }
                line.push_str(&item);
            }
            if !any {
                line.push_str(" (no slots)");
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// The map as one line of JSON: `{"version":..,"slots":..,"shards":..,"weights":[..],
    /// "slot_counts":[..],"ranges":[{"lo":..,"hi":..,"shard":..},..]}`.
    pub fn show_json(&self) -> String {
        let join = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let ranges: Vec<String> = self
            .ranges()
            .iter()
            .map(|r| format!("{{\"lo\":{},\"hi\":{},\"shard\":{}}}", r.lo, r.hi, r.shard))
            .collect();
        format!(
            "{{\"version\":{},\"slots\":{},\"shards\":{},\"weights\":[{}],\"slot_counts\":[{}],\"ranges\":[{}]}}",
            self.version,
            self.slots,
            self.shards(),
            join(&self.weights),
            join(&self.slot_counts()),
            ranges.join(",")
        )
    }
}

impl fmt::Display for ShardMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_toml())
    }
}

impl std::str::FromStr for ShardMap {
    type Err = MapError;
    fn from_str(s: &str) -> Result<ShardMap, MapError> {
        ShardMap::from_toml(s)
    }
}

/// Slot counts per shard proportional to the weights, summing to `slots` exactly
/// (largest remainder; ties go to the lower shard index so the result is deterministic).
pub(crate) fn proportional_counts(weights: &[u32], slots: u32) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let mut counts: Vec<u32> = Vec::with_capacity(weights.len());
    let mut rems: Vec<(u64, usize)> = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let exact = u64::from(w) * u64::from(slots);
        counts.push((exact / total) as u32);
        rems.push((exact % total, i));
    }
    let assigned: u32 = counts.iter().sum();
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rems.iter().take((slots - assigned) as usize) {
        counts[i] += 1;
    }
    counts
}

/// Checks a slot count and weights as a map would (version aside).
pub(crate) fn check_layout(slots: u32, weights: &[u32]) -> Result<(), MapError> {
    check_slots(u64::from(slots))?;
    check_header(1, weights.len() as u64, weights)?;
    Ok(())
}

fn check_slots(slots: u64) -> Result<u32, MapError> {
    if slots == 0 || slots > u64::from(MAX_SLOTS) || !slots.is_power_of_two() {
        return Err(MapError::BadSlots(slots));
    }
    Ok(slots as u32)
}

/// Checks version, shard count and weights; returns the shard count.
fn check_header(version: u64, shards: u64, weights: &[u32]) -> Result<u32, MapError> {
    if version > i64::MAX as u64 {
        return Err(MapError::BadVersion(version));
    }
    if shards == 0 || shards > u64::from(MAX_SHARDS) {
        return Err(MapError::BadShardCount(shards));
    }
    let sum: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if sum == 0 || sum > MAX_TOTAL_WEIGHT {
        return Err(MapError::BadWeights { sum });
    }
    Ok(shards as u32)
}

fn gap_place(before: Option<&RangeRef>, after: Option<&RangeRef>) -> String {
    match (before, after) {
        (Some(b), Some(a)) => format!("between {b} and {a}"),
        (None, Some(a)) => format!("before {a}"),
        (Some(b), None) => format!("after {b}, the last range"),
        (None, None) => "there are no ranges".to_owned(),
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!("line {}: {}", line_of(text, span.start), e.message()),
        None => e.message().to_owned(),
    }
}

/// The file format. Integers are read wide so that a negative or huge value gets our
/// message rather than a type error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    version: u64,
    slots: u64,
    shards: u64,
    #[serde(default)]
    weights: Option<Vec<u32>>,
    ranges: Vec<toml::Spanned<RangeEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeEntry {
    lo: u32,
    hi: u32,
    shard: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "version = 3\nslots = 16\nshards = 2\n\n[[ranges]]\nlo = 0\nhi = 7\nshard = 0\n\n[[ranges]]\nlo = 8\nhi = 15\nshard = 1\n";

    fn err(text: &str) -> String {
        match ShardMap::from_toml(text) {
            Ok(m) => panic!("accepted:\n{text}\nas {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn with_ranges(ranges: &str) -> String {
        format!("version = 1\nslots = 16\nshards = 2\nranges = [\n{ranges}]\n")
    }

    #[test]
    fn parses_array_of_tables_and_writes_one_line_per_range() {
        let m = ShardMap::from_toml(TWO).expect("valid");
        assert_eq!((m.version(), m.slots(), m.shards()), (3, 16, 2));
        assert_eq!(m.weights(), &[1, 1]);
        assert_eq!(m.shard_of_slot(7), 0);
        assert_eq!(m.shard_of_slot(8), 1);
        assert_eq!(m.get(16), None);
        assert_eq!(m.slot_counts(), vec![8, 8]);
        let text = m.to_toml();
        assert!(
            text.contains("version = 3\nslots = 16\nshards = 2\nweights = [1, 1]\n"),
            "{text}"
        );
        assert!(text.contains("ranges = [\n  { lo = 0, hi = 7, shard = 0 },\n  { lo = 8, hi = 15, shard = 1 },\n]\n"), "{text}");
        let again = ShardMap::from_toml(&text).expect("own output parses");
        assert_eq!(again, m);
        assert_eq!(again.to_toml(), text, "byte-stable");
    }

    #[test]
    fn adjacent_ranges_of_one_shard_merge_and_order_does_not_matter() {
        let m = ShardMap::from_toml(&with_ranges(
            "{ lo = 8, hi = 15, shard = 1 },\n{ lo = 4, hi = 7, shard = 0 },\n{ lo = 0, hi = 3, shard = 0 },\n",
        ))
        .expect("valid");
        assert_eq!(
            m.ranges(),
            vec![
                SlotRange {
                    lo: 0,
                    hi: 7,
                    shard: 0
                },
                SlotRange {
                    lo: 8,
                    hi: 15,
                    shard: 1
                }
            ]
        );
        assert_eq!(
            m.to_toml(),
            ShardMap::from_toml(TWO)
                .expect("valid")
                .with_version(1)
                .expect("ok")
                .to_toml()
        );
    }

    #[test]
    fn errors_name_the_range_and_line() {
        let e = err(&with_ranges(
            "{ lo = 0, hi = 7, shard = 0 },\n{ lo = 9, hi = 15, shard = 1 },\n",
        ));
        assert_eq!(
            e,
            "slots 8-8 are owned by no shard (between ranges[0] (line 5) { lo = 0, hi = 7, shard = 0 } \
             and ranges[1] (line 6) { lo = 9, hi = 15, shard = 1 })"
        );
        let e = err(&with_ranges(
            "{ lo = 0, hi = 8, shard = 0 },\n{ lo = 8, hi = 15, shard = 1 },\n",
        ));
        assert_eq!(
            e,
            "ranges[1] (line 6) { lo = 8, hi = 15, shard = 1 } overlaps ranges[0] (line 5) \
             { lo = 0, hi = 8, shard = 0 }: slots 8-8 are owned twice"
        );
        let e = err(&with_ranges(
            "{ lo = 0, hi = 7, shard = 0 },\n{ lo = 8, hi = 15, shard = 2 },\n",
        ));
        assert_eq!(e, "ranges[1] (line 6) { lo = 8, hi = 15, shard = 2 }: shard 2 does not exist (shards = 2, so 0-1)");
        let e = err(&with_ranges("{ lo = 0, hi = 16, shard = 0 },\n"));
        assert_eq!(
            e,
            "ranges[0] (line 5) { lo = 0, hi = 16, shard = 0 }: outside the slots 0-15"
        );
        let e = err(&with_ranges("{ lo = 5, hi = 4, shard = 0 },\n"));
        assert_eq!(
            e,
            "ranges[0] (line 5) { lo = 5, hi = 4, shard = 0 }: hi is below lo"
        );
        let e = err(&with_ranges("{ lo = 1, hi = 15, shard = 0 },\n"));
        assert!(
            e.starts_with("slots 0-0 are owned by no shard (before ranges[0]"),
            "{e}"
        );
        let e = err(&with_ranges("{ lo = 0, hi = 14, shard = 0 },\n"));
        assert!(
            e.starts_with("slots 15-15 are owned by no shard (after ranges[0]"),
            "{e}"
        );
        let e = err(&with_ranges(""));
        assert_eq!(e, "slots 0-15 are owned by no shard (there are no ranges)");
        // A range inside another one.
        let e = err(&with_ranges(
            "{ lo = 0, hi = 15, shard = 0 },\n{ lo = 3, hi = 4, shard = 1 },\n",
        ));
        assert!(e.ends_with("slots 3-4 are owned twice"), "{e}");
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            err("version = 1\nslots = 12\nshards = 1\nranges = []\n"),
            "slots = 12: must be a power of two between 1 and 1048576"
        );
        assert_eq!(
            err("version = 1\nslots = 16\nshards = 0\nranges = []\n"),
            "shards = 0: must be between 1 and 4096"
        );
        assert_eq!(
            err("version = 1\nslots = 16\nshards = 2\nweights = [1]\nranges = []\n"),
            "weights has 1 entries but shards = 2"
        );
        assert!(
            err("version = 1\nslots = 16\nshards = 2\nweights = [0, 0]\nranges = []\n")
                .starts_with("weights: at least one")
        );
        let e = err("version = 1\nslots = 16\nshards = 1\nrange = []\n");
        assert!(
            e.starts_with("shard map: line 4: unknown field `range`"),
            "{e}"
        );
        let e = err("version = 1\nslots = 16\nshards = 1\nranges = [\n{ lo = -1, hi = 15, shard = 0 },\n]\n");
        assert!(e.starts_with("shard map: line 5:"), "{e}");
        let e = err("version = 1\nslots = 16\n");
        assert!(e.contains("missing field"), "{e}");
        let e = err("version = \n");
        assert!(e.starts_with("shard map: line 1:"), "{e}");
    }

    #[test]
    fn constructors_validate() {
        assert_eq!(
            ShardMap::from_table(1, vec![1], vec![0; 12]),
            Err(MapError::BadSlots(12))
        );
        assert_eq!(
            ShardMap::from_table(1, vec![1, 1], vec![0, 1, 2, 0]),
            Err(MapError::TableShard {
                slot: 2,
                shard: 2,
                shards: 2
            })
        );
        assert_eq!(
            ShardMap::from_table(u64::MAX, vec![1], vec![0; 4]),
            Err(MapError::BadVersion(u64::MAX))
        );
        assert!(ShardMap::from_ranges(
            1,
            4,
            vec![1],
            &[SlotRange {
                lo: 0,
                hi: 3,
                shard: 0
            }]
        )
        .is_ok());
    }

    #[test]
    fn contiguous_initial_is_exact() {
        let specs = [
            ShardSpec { weight: 1 },
            ShardSpec { weight: 2 },
            ShardSpec { weight: 1 },
        ];
        let m = ShardMap::initial_contiguous(&specs, 4096).expect("valid");
        assert_eq!(m.slot_counts(), vec![1024, 2048, 1024]);
        assert_eq!(m.ranges().len(), 3);
        let m = ShardMap::initial_contiguous(&[ShardSpec::default(); 3], 4096).expect("valid");
        assert_eq!(m.slot_counts(), vec![1366, 1365, 1365]);
        assert_eq!(m.version(), 1);
    }

    #[test]
    fn key_lookup_uses_the_postgres_slot() {
        let m = ShardMap::from_toml(TWO).expect("valid");
        for v in -500..500i64 {
            let k = KeyValue::Int(v);
            let slot = crate::slot_of(&k, 16);
            assert_eq!(m.slot_of_key(&k), slot);
            assert_eq!(m.shard_of_key(&k), if slot < 8 { 0 } else { 1 });
        }
    }

    #[test]
    fn display_helpers() {
        let m = ShardMap::from_toml(TWO).expect("valid");
        let t = m.show_table();
        assert!(
            t.starts_with("shard map version 3: 16 slots on 2 shards\n"),
            "{t}"
        );
        assert!(
            t.contains("    0       1        8   50.0%       1\n"),
            "{t}"
        );
        assert!(t.contains("\nshard 1:\n  8-15\n"), "{t}");
        assert_eq!(
            m.show_json(),
            "{\"version\":3,\"slots\":16,\"shards\":2,\"weights\":[1,1],\"slot_counts\":[8,8],\
             \"ranges\":[{\"lo\":0,\"hi\":7,\"shard\":0},{\"lo\":8,\"hi\":15,\"shard\":1}]}"
        );
    }
}
