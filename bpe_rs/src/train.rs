//! Byte-level BPE training: count unique chunks, then merge with incremental pair counts and a lazy max-heap.
//!
//! Merge order (the contract with nanochat's reference trainer, `rustbpe`): at every step the pair with the highest
//! count over all chunks is merged; among equal counts, the smallest pair `(left_id, right_id)` wins. Pair counts
//! are exact (each merge subtracts and adds the pair occurrences it destroys and creates), so the heap only has to be
//! lazy: an entry whose count is out of date is refreshed when it reaches the top.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::split::Splitter;

// ------------------------------------------------------------------------------------------------------------------
// A small fast hasher (multiply-fold), for byte strings and packed pairs
// ------------------------------------------------------------------------------------------------------------------

const K: u64 = 0xf135_7aea_2e62_a9c5;

#[derive(Default, Clone, Copy)]
pub struct FoldHasher {
    h: u64,
}

impl FoldHasher {
    #[inline(always)]
    fn mix(&mut self, x: u64) {
        let full = ((self.h ^ x) as u128).wrapping_mul(K as u128);
        self.h = (full as u64) ^ ((full >> 64) as u64);
    }
}

impl Hasher for FoldHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline(always)]
    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }
    #[inline(always)]
    fn write_usize(&mut self, x: usize) {
        self.mix(x as u64);
    }
    #[inline(always)]
    fn finish(&self) -> u64 {
        self.h
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FoldHasher>>;

// ------------------------------------------------------------------------------------------------------------------
// Chunk counting (streamed: one batch of documents at a time)
// ------------------------------------------------------------------------------------------------------------------

/// Counts of unique chunks, kept in one map per worker so batches need no merging until the end.
pub struct ChunkCounter {
    shards: Vec<Mutex<FastMap<Box<[u8]>, i64>>>,
}

impl ChunkCounter {
    pub fn new() -> Self {
        let n = rayon::current_num_threads().max(1);
        ChunkCounter { shards: (0..n).map(|_| Mutex::new(FastMap::default())).collect() }
    }

    /// Split and count one batch of documents, in parallel.
    pub fn add_batch(&self, docs: &[&str], splitter: &Splitter) -> Result<(), String> {
        let total: usize = docs.iter().map(|d| d.len()).sum();
        if docs.is_empty() {
            return Ok(());
        }
        // Cut the batch into one contiguous group per shard, of about equal byte size.
        let nshards = self.shards.len();
        let mut bounds = vec![0usize];
        let mut acc = 0usize;
        for (k, d) in docs.iter().enumerate() {
            acc += d.len();
            let target = total * bounds.len() / nshards;
            if acc >= target && bounds.len() < nshards && k + 1 < docs.len() {
                bounds.push(k + 1);
            }
        }
        bounds.push(docs.len());
        let groups: Vec<&[&str]> = bounds.windows(2).map(|w| &docs[w[0]..w[1]]).collect();
        let shards = &self.shards;
        groups
            .into_par_iter()
            .enumerate()
            .map(|(g, group)| {
                let mut map = shards[g].lock().unwrap();
                for doc in group {
                    splitter.split(doc, |piece| {
                        let key = piece.as_bytes();
                        if let Some(c) = map.get_mut(key) {
                            *c += 1;
                        } else {
                            map.insert(key.into(), 1);
                        }
                    })?;
                }
                Ok(())
            })
            .collect::<Result<Vec<()>, String>>()?;
        Ok(())
    }

    /// All unique chunks and their counts.
    pub fn finish(self) -> (Vec<Box<[u8]>>, Vec<i64>) {
        let mut maps: Vec<_> = self.shards.into_iter().map(|m| m.into_inner().unwrap()).collect();
        maps.sort_by_key(|m| Reverse(m.len()));
        let mut it = maps.into_iter();
        let mut all = it.next().unwrap_or_default();
        for m in it {
            for (k, v) in m {
                *all.entry(k).or_insert(0) += v;
            }
        }
        all.into_iter().unzip()
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Merging
// ------------------------------------------------------------------------------------------------------------------

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// The learned merges, in order: merge `k` joins `merges[k]` into token `256 + k`.
pub fn train(chunks: &[Box<[u8]>], counts: &[i64], vocab_size: u32) -> Vec<(u32, u32)> {
    let num_merges = vocab_size.saturating_sub(256) as usize;
    let mut merges = Vec::with_capacity(num_merges.min(1 << 20));
    if num_merges == 0 {
        return merges;
    }

    // Chunks of one byte never hold a pair; the rest go into one flat token array.
    let mut start: Vec<u32> = Vec::new();
    let mut len: Vec<u32> = Vec::new();
    let mut weight: Vec<i64> = Vec::new();
    let mut tokens: Vec<u32> = Vec::with_capacity(chunks.iter().map(|c| c.len()).sum());
    for (c, &n) in chunks.iter().zip(counts) {
        if c.len() >= 2 {
            start.push(tokens.len() as u32);
            len.push(c.len() as u32);
            weight.push(n);
            tokens.extend(c.iter().map(|&b| b as u32));
        }
    }

    // Pair table: id -> (pair, count, words that may hold it).
    let mut pair_id: FastMap<u64, u32> = FastMap::default();
    let mut pair_key: Vec<u64> = Vec::new();
    let mut pair_count: Vec<i64> = Vec::new();
    let mut pair_words: Vec<Vec<u32>> = Vec::new();
    for w in 0..start.len() {
        let s = start[w] as usize;
        let ids = &tokens[s..s + len[w] as usize];
        for p in ids.windows(2) {
            let key = pack(p[0], p[1]);
            let id = *pair_id.entry(key).or_insert_with(|| {
                pair_key.push(key);
                pair_count.push(0);
                pair_words.push(Vec::new());
                (pair_key.len() - 1) as u32
            }) as usize;
            pair_count[id] += weight[w];
            if pair_words[id].last() != Some(&(w as u32)) {
                pair_words[id].push(w as u32);
            }
        }
    }

    // Max-heap on (count, smallest pair first).
    let mut heap: BinaryHeap<(i64, Reverse<u64>, u32)> = pair_count
        .iter()
        .enumerate()
        .filter(|&(_, &c)| c > 0)
        .map(|(id, &c)| (c, Reverse(pair_key[id]), id as u32))
        .collect();

    let mut last_merge_of_word: Vec<u32> = vec![u32::MAX; start.len()];
    let mut created: Vec<u32> = Vec::new();
    while merges.len() < num_merges {
        let Some((count, Reverse(key), id)) = heap.pop() else { break };
        let id = id as usize;
        let current = pair_count[id];
        if count != current {
            if current > 0 {
                heap.push((current, Reverse(key), id as u32));
            }
            continue;
        }
        if count <= 0 {
            break;
        }
        let (a, b) = ((key >> 32) as u32, key as u32);
        let z = 256 + merges.len() as u32;
        merges.push((a, b));

        let words = std::mem::take(&mut pair_words[id]);
        created.clear();
        for &w in &words {
            let wi = w as usize;
            if last_merge_of_word[wi] == z {
                continue;
            }
            last_merge_of_word[wi] = z;
            let s = start[wi] as usize;
            let n = len[wi] as usize;
            let ids = &mut tokens[s..s + n];
            let wt = weight[wi];
            let mut changed = false;
            let (mut i, mut j) = (0usize, 0usize);
            while i < n {
                if i + 1 < n && ids[i] == a && ids[i + 1] == b {
                    changed = true;
                    // Pairs destroyed: (left, a), (a, b), (b, right); created: (left, z), (z, right).
                    pair_count[id] -= wt;
                    if j > 0 {
                        let left = ids[j - 1];
                        let pid = pair_id[&pack(left, a)] as usize;
                        pair_count[pid] -= wt;
                        add_created(
                            pack(left, z), w, wt, &mut pair_id, &mut pair_key, &mut pair_count,
                            &mut pair_words, &mut created,
                        );
                    }
                    if i + 2 < n {
                        let right = ids[i + 2];
                        let pid = pair_id[&pack(b, right)] as usize;
                        pair_count[pid] -= wt;
                        add_created(
                            pack(z, right), w, wt, &mut pair_id, &mut pair_key, &mut pair_count,
                            &mut pair_words, &mut created,
                        );
                    }
                    ids[j] = z;
                    i += 2;
                } else {
                    ids[j] = ids[i];
                    i += 1;
                }
                j += 1;
            }
            if changed {
                len[wi] = j as u32;
            }
        }
        for &pid in &created {
            let c = pair_count[pid as usize];
            if c > 0 {
                heap.push((c, Reverse(pair_key[pid as usize]), pid));
            }
        }
    }
    merges
}

/// Count one occurrence (of weight `wt`, in word `w`) of a pair that holds the newest token.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn add_created(
    key: u64,
    w: u32,
    wt: i64,
    pair_id: &mut FastMap<u64, u32>,
    pair_key: &mut Vec<u64>,
    pair_count: &mut Vec<i64>,
    pair_words: &mut Vec<Vec<u32>>,
    created: &mut Vec<u32>,
) {
    let id = *pair_id.entry(key).or_insert_with(|| {
        pair_key.push(key);
        pair_count.push(0);
        pair_words.push(Vec::new());
        created.push(pair_key.len() as u32 - 1);
        (pair_key.len() - 1) as u32
    }) as usize;
    pair_count[id] += wt;
    if pair_words[id].last() != Some(&w) {
        pair_words[id].push(w);
    }
}

/// Bytes of every token: 0..256 are the bytes themselves, then one per merge.
pub fn token_bytes(merges: &[(u32, u32)]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut t = out[a as usize].clone();
        t.extend_from_slice(&out[b as usize]);
        out.push(t);
    }
    out
}
