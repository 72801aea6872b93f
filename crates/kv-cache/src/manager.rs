use rustc_hash::FxHashMap;

use crate::hash::BlockHash;

/// Index of a physical KV block.
pub type BlockId = u32;
/// A sequence (request) that owns a block table.
pub type SeqId = u64;

const NIL: u32 = u32::MAX;

/// Shape of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Tokens per block.
    pub block_tokens: u32,
    /// Physical blocks in the pool.
    pub num_blocks: u32,
    /// KV bytes one token occupies (all layers, K and V).
    pub bytes_per_token: u64,
    /// Keep and reuse the blocks of finished sequences by content hash.
    pub enable_prefix_caching: bool,
}

impl KvCacheConfig {
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.block_tokens) * self.bytes_per_token
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("out of KV cache blocks: need {needed}, only {available} free or evictable")]
    OutOfBlocks { needed: u32, available: u32 },
    #[error("sequence {0} already has a block table")]
    SequenceExists(SeqId),
    #[error("sequence {0} has no block table")]
    UnknownSequence(SeqId),
}

/// Block counts at one moment; `used + cached + free == total` always.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvUsage {
    pub total_blocks: u32,
    /// Referenced by at least one sequence.
    pub used_blocks: u32,
    /// Unreferenced but holding a cached prefix (evictable, LRU).
    pub cached_blocks: u32,
    /// Unreferenced and empty.
    pub free_blocks: u32,
    pub block_bytes: u64,
}

impl KvUsage {
    pub fn used_bytes(&self) -> u64 {
        u64::from(self.used_blocks) * self.block_bytes
    }
    pub fn cached_bytes(&self) -> u64 {
        u64::from(self.cached_blocks) * self.block_bytes
    }
    pub fn free_bytes(&self) -> u64 {
        u64::from(self.free_blocks) * self.block_bytes
    }
    /// Fraction of blocks referenced by running sequences.
    pub fn used_fraction(&self) -> f64 {
        f64::from(self.used_blocks) / f64::from(self.total_blocks.max(1))
    }
    /// Blocks an allocation could get (free plus evictable).
    pub fn available_blocks(&self) -> u32 {
        self.free_blocks + self.cached_blocks
    }
}

/// Cumulative counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Prompt tokens looked up for reuse at admission.
    pub lookup_tokens: u64,
    /// Of those, tokens found cached and reused.
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

#[derive(Clone, Debug)]
struct BlockMeta {
    ref_count: u32,
    hash: Option<BlockHash>,
    lru_prev: u32,
    lru_next: u32,
}

#[derive(Clone, Debug, Default)]
struct SeqTable {
    blocks: Vec<BlockId>,
    /// Tokens with a slot in `blocks`.
    tokens: u64,
    /// Leading blocks already registered in (or matched from) the hash table.
    hashed_blocks: usize,
    /// Hashes of the full prompt blocks this sequence computes itself and has not committed yet,
    /// for blocks `hashed_blocks..` in order (see [`KvCacheManager::being_computed`]).
    in_flight: std::collections::VecDeque<BlockHash>,
}

fn release_in_flight(in_flight: &mut FxHashMap<BlockHash, u32>, h: BlockHash) {
    if let std::collections::hash_map::Entry::Occupied(mut slot) = in_flight.entry(h) {
        *slot.get_mut() -= 1;
        if *slot.get() == 0 {
            slot.remove();
        }
    }
}

/// The paged block manager: a block pool plus one block table per sequence.
#[derive(Clone, Debug)]
pub struct KvCacheManager {
    config: KvCacheConfig,
    blocks: Vec<BlockMeta>,
    free: Vec<BlockId>,
    lru_head: u32,
    lru_tail: u32,
    evictable: u32,
    used: u32,
    cached: FxHashMap<BlockHash, BlockId>,
    /// Prompt blocks some running sequence is computing now, by hash (with how many are).
    in_flight: FxHashMap<BlockHash, u32>,
    tables: FxHashMap<SeqId, SeqTable>,
    stats: KvStats,
}

impl KvCacheManager {
    pub fn new(config: KvCacheConfig) -> Self {
        assert!(config.block_tokens > 0, "block size must be positive");
        KvCacheManager {
            config,
            blocks: vec![
                BlockMeta {
                    ref_count: 0,
                    hash: None,
                    lru_prev: NIL,
                    lru_next: NIL,
                };
                config.num_blocks as usize
            ],
            free: (0..config.num_blocks).rev().collect(),
            lru_head: NIL,
            lru_tail: NIL,
            evictable: 0,
            used: 0,
            cached: FxHashMap::default(),
            in_flight: FxHashMap::default(),
            tables: FxHashMap::default(),
            stats: KvStats::default(),
        }
    }

    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    pub fn usage(&self) -> KvUsage {
        KvUsage {
            total_blocks: self.config.num_blocks,
            used_blocks: self.used,
            cached_blocks: self.evictable,
            free_blocks: self.free.len() as u32,
            block_bytes: self.config.block_bytes(),
        }
    }

    pub fn stats(&self) -> KvStats {
        self.stats
    }

    pub fn blocks_for_tokens(&self, tokens: u64) -> u32 {
        tokens.div_ceil(u64::from(self.config.block_tokens)) as u32
    }

    pub fn has_sequence(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }

    /// The block table of `seq`.
    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.tables.get(&seq).map(|t| t.blocks.as_slice())
    }

    /// Tokens with a slot in `seq`'s table.
    pub fn sequence_tokens(&self, seq: SeqId) -> Option<u64> {
        self.tables.get(&seq).map(|t| t.tokens)
    }

    /// How many leading blocks of a sequence with these full-block hashes are cached now.
    /// Looks only; changes nothing.
    pub fn match_prefix(&self, hashes: &[BlockHash]) -> usize {
        if !self.config.enable_prefix_caching {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Whether a running sequence is computing the block with this hash now (admitted, not yet
    /// committed). A sequence that would compute the same block again had better wait for it:
    /// under chunked prefill, requests sharing a long prefix otherwise each recompute it.
    pub fn being_computed(&self, hash: &BlockHash) -> bool {
        self.config.enable_prefix_caching && self.in_flight.contains_key(hash)
    }

    /// Creates `seq`'s table: reuses its first `reuse_blocks` cached blocks (as found by
    /// [`Self::match_prefix`]) and allocates slots for `new_tokens` more tokens after them.
    /// `hashes` are the full-block hashes of the sequence's known tokens; the ones past the reused
    /// blocks count as being computed by `seq` until committed or freed.
    /// `lookup_tokens` is what the caller asked to reuse (for the hit statistics). All or nothing.
    pub fn admit(
        &mut self,
        seq: SeqId,
        hashes: &[BlockHash],
        reuse_blocks: usize,
        new_tokens: u64,
        lookup_tokens: u64,
    ) -> Result<(), KvError> {
        if self.tables.contains_key(&seq) {
            return Err(KvError::SequenceExists(seq));
        }
        let reuse = &hashes[..reuse_blocks.min(self.match_prefix(hashes))];
        let reused: Vec<BlockId> = reuse.iter().map(|h| self.cached[h]).collect();
        let reused_idle = reused
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_count == 0)
            .count() as u32;
        let reused_tokens = reused.len() as u64 * u64::from(self.config.block_tokens);
        let needed = self.blocks_for_tokens(reused_tokens + new_tokens) - reused.len() as u32;
        let available = self.usage().available_blocks() - reused_idle;
        if needed > available {
            return Err(KvError::OutOfBlocks { needed, available });
        }
        for &b in &reused {
            self.take_ref(b);
        }
        let mut table = SeqTable {
            blocks: reused,
            tokens: reused_tokens,
            hashed_blocks: reuse.len(),
            in_flight: Default::default(),
        };
        if self.config.enable_prefix_caching {
            for &h in &hashes[reuse.len()..] {
                *self.in_flight.entry(h).or_insert(0) += 1;
                table.in_flight.push_back(h);
            }
        }
        for _ in 0..needed {
            let b = self.pop_block().expect("availability was checked");
            table.blocks.push(b);
        }
        table.tokens += new_tokens;
        self.stats.lookup_tokens += lookup_tokens;
        self.stats.hit_tokens += reused_tokens;
        self.tables.insert(seq, table);
        Ok(())
    }

    /// Blocks that growing `seq` by `new_tokens` would allocate.
    pub fn blocks_needed_to_grow(&self, seq: SeqId, new_tokens: u64) -> Result<u32, KvError> {
        let table = self.tables.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        Ok(self.blocks_for_tokens(table.tokens + new_tokens) - table.blocks.len() as u32)
    }

    /// Gives `seq` slots for `new_tokens` more tokens. All or nothing.
    pub fn grow(&mut self, seq: SeqId, new_tokens: u64) -> Result<(), KvError> {
        let needed = self.blocks_needed_to_grow(seq, new_tokens)?;
        let available = self.usage().available_blocks();
        if needed > available {
            return Err(KvError::OutOfBlocks { needed, available });
        }
        let mut fresh = Vec::with_capacity(needed as usize);
        for _ in 0..needed {
            fresh.push(self.pop_block().expect("availability was checked"));
        }
        let table = self.tables.get_mut(&seq).expect("checked above");
        table.blocks.extend(fresh);
        table.tokens += new_tokens;
        Ok(())
    }

    /// Registers the content hashes of `seq`'s full blocks whose tokens are now computed, so that
    /// later sequences can reuse them. `hashes[i]` is the hash of block `i`; blocks beyond the
    /// table or already registered are skipped. A block whose content is already cached in another
    /// block stays unregistered (it is freed plainly).
    pub fn commit_hashes(&mut self, seq: SeqId, hashes: &[BlockHash]) -> Result<(), KvError> {
        if !self.config.enable_prefix_caching {
            return Ok(());
        }
        let table = self
            .tables
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let upto = hashes.len().min(table.blocks.len());
        let start = table.hashed_blocks.min(upto);
        for (&b, &hash) in table.blocks[start..upto].iter().zip(&hashes[start..upto]) {
            let meta = &mut self.blocks[b as usize];
            if meta.hash.is_none() {
                if let std::collections::hash_map::Entry::Vacant(slot) = self.cached.entry(hash) {
                    slot.insert(b);
                    meta.hash = Some(hash);
                }
            }
        }
        let newly = upto.saturating_sub(table.hashed_blocks);
        table.hashed_blocks = table.hashed_blocks.max(upto);
        for _ in 0..newly {
            let Some(h) = table.in_flight.pop_front() else {
                break;
            };
            release_in_flight(&mut self.in_flight, h);
        }
        Ok(())
    }

    /// Releases `seq`'s table. Its cached blocks stay reusable until evicted; the tail of the
    /// sequence is evicted before its head.
    pub fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        let table = self
            .tables
            .remove(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        for h in table.in_flight {
            release_in_flight(&mut self.in_flight, h);
        }
        for &b in table.blocks.iter().rev() {
            self.drop_ref(b);
        }
        Ok(())
    }

    fn take_ref(&mut self, b: BlockId) {
        let meta = &mut self.blocks[b as usize];
        if meta.ref_count == 0 {
            self.lru_unlink(b);
            self.evictable -= 1;
            self.used += 1;
        }
        self.blocks[b as usize].ref_count += 1;
    }

    fn drop_ref(&mut self, b: BlockId) {
        let meta = &mut self.blocks[b as usize];
        debug_assert!(meta.ref_count > 0, "double free of block {b}");
        meta.ref_count -= 1;
        if meta.ref_count == 0 {
            self.used -= 1;
            if meta.hash.is_some() {
                self.lru_push_tail(b);
                self.evictable += 1;
            } else {
                self.free.push(b);
            }
        }
    }

    /// A block with ref count 1: from the free list, else the least recently used cached block.
    fn pop_block(&mut self) -> Option<BlockId> {
        let b = if let Some(b) = self.free.pop() {
            b
        } else {
            let b = self.lru_head;
            if b == NIL {
                return None;
            }
            self.lru_unlink(b);
            self.evictable -= 1;
            let hash = self.blocks[b as usize]
                .hash
                .take()
                .expect("evictable blocks are hashed");
            self.cached.remove(&hash);
            self.stats.evictions += 1;
            b
        };
        self.blocks[b as usize].ref_count = 1;
        self.used += 1;
        Some(b)
    }

    fn lru_unlink(&mut self, b: BlockId) {
        let (prev, next) = {
            let m = &self.blocks[b as usize];
            (m.lru_prev, m.lru_next)
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.blocks[prev as usize].lru_next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.blocks[next as usize].lru_prev = prev;
        }
        let m = &mut self.blocks[b as usize];
        m.lru_prev = NIL;
        m.lru_next = NIL;
    }

    fn lru_push_tail(&mut self, b: BlockId) {
        let tail = self.lru_tail;
        {
            let m = &mut self.blocks[b as usize];
            m.lru_prev = tail;
            m.lru_next = NIL;
        }
        if tail == NIL {
            self.lru_head = b;
        } else {
            self.blocks[tail as usize].lru_next = b;
        }
        self.lru_tail = b;
    }

    /// Checks every internal invariant; for tests. Returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for (seq, t) in &self.tables {
            for &b in &t.blocks {
                refs[b as usize] += 1;
            }
            let capacity = t.blocks.len() as u64 * u64::from(self.config.block_tokens);
            if t.tokens > capacity || capacity >= t.tokens + u64::from(self.config.block_tokens) {
                return Err(format!(
                    "sequence {seq}: {} tokens in {} blocks",
                    t.tokens,
                    t.blocks.len()
                ));
            }
        }
        let mut in_free = vec![false; self.blocks.len()];
        for &b in &self.free {
            if std::mem::replace(&mut in_free[b as usize], true) {
                return Err(format!("block {b} twice on the free list"));
            }
        }
        let mut in_lru = vec![false; self.blocks.len()];
        let mut cur = self.lru_head;
        let mut prev = NIL;
        let mut lru_len = 0u32;
        while cur != NIL {
            if std::mem::replace(&mut in_lru[cur as usize], true) {
                return Err(format!("LRU list cycles at block {cur}"));
            }
            if self.blocks[cur as usize].lru_prev != prev {
                return Err(format!("LRU back link broken at block {cur}"));
            }
            prev = cur;
            cur = self.blocks[cur as usize].lru_next;
            lru_len += 1;
        }
        if prev != self.lru_tail || lru_len != self.evictable {
            return Err("LRU tail or length wrong".into());
        }
        let mut used = 0;
        for (b, meta) in self.blocks.iter().enumerate() {
            if meta.ref_count != refs[b] {
                return Err(format!(
                    "block {b}: ref count {} but {} tables hold it",
                    meta.ref_count, refs[b]
                ));
            }
            let states =
                u32::from(meta.ref_count > 0) + u32::from(in_free[b]) + u32::from(in_lru[b]);
            if states != 1 {
                return Err(format!("block {b} is in {states} of used/free/evictable"));
            }
            if in_free[b] && meta.hash.is_some() {
                return Err(format!("free block {b} still has a hash"));
            }
            if in_lru[b] && meta.hash.is_none() {
                return Err(format!("evictable block {b} has no hash"));
            }
            if let Some(h) = meta.hash {
                if self.cached.get(&h) != Some(&(b as BlockId)) {
                    return Err(format!("block {b}'s hash is not mapped to it"));
                }
            }
            used += u32::from(meta.ref_count > 0);
        }
        if used != self.used {
            return Err(format!(
                "used count {} but {used} referenced blocks",
                self.used
            ));
        }
        for (h, &b) in &self.cached {
            if self.blocks[b as usize].hash != Some(*h) {
                return Err(format!("hash map entry for block {b} is stale"));
            }
        }
        let u = self.usage();
        if u.used_blocks + u.cached_blocks + u.free_blocks != u.total_blocks {
            return Err("used + cached + free != total".into());
        }
        Ok(())
    }
}
