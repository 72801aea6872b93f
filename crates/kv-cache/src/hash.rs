/// A chained content hash of one full block: it names the block's tokens *and* every token before
/// it in the sequence, so equal hashes mean equal prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

#[inline]
fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: cheap and well distributed.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const ROOT_SEED: u64 = 0x5eed_b10c_0000_0001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    content_id: u64,
    offset: u64,
    len: u64,
}

/// Turns a token sequence, fed as pieces of content-identified chunks, into the hashes of its
/// full blocks. Feeding the same tokens split differently (a chunk at once, or token by token)
/// gives the same hashes.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    block_tokens: u64,
    parent: u64,
    pending: Vec<Piece>,
    pending_tokens: u64,
    hashes: Vec<BlockHash>,
}

impl BlockHasher {
    pub fn new(block_tokens: u32) -> Self {
        assert!(block_tokens > 0, "block size must be positive");
        BlockHasher {
            block_tokens: u64::from(block_tokens),
            parent: ROOT_SEED,
            pending: Vec::new(),
            pending_tokens: 0,
            hashes: Vec::new(),
        }
    }

    /// Hashes of the full blocks seen so far.
    pub fn hashes(&self) -> &[BlockHash] {
        &self.hashes
    }

    /// Tokens fed so far.
    pub fn tokens(&self) -> u64 {
        self.hashes.len() as u64 * self.block_tokens + self.pending_tokens
    }

    /// Feeds tokens `[offset, offset + len)` of the chunk named `content_id`.
    pub fn push(&mut self, content_id: u64, mut offset: u64, mut len: u64) {
        while len > 0 {
            let room = self.block_tokens - self.pending_tokens;
            let take = room.min(len);
            match self.pending.last_mut() {
                Some(last) if last.content_id == content_id && last.offset + last.len == offset => {
                    last.len += take;
                }
                _ => self.pending.push(Piece {
                    content_id,
                    offset,
                    len: take,
                }),
            }
            self.pending_tokens += take;
            offset += take;
            len -= take;
            if self.pending_tokens == self.block_tokens {
                let mut h = mix(self.parent);
                for piece in &self.pending {
                    h = mix(h ^ piece.content_id);
                    h = mix(h ^ piece.offset);
                    h = mix(h ^ piece.len);
                }
                self.hashes.push(BlockHash(h));
                self.parent = h;
                self.pending.clear();
                self.pending_tokens = 0;
            }
        }
    }

    /// Feeds a whole chunk.
    pub fn push_chunk(&mut self, chunk: workload::Chunk) {
        self.push(chunk.content_id, 0, u64::from(chunk.len_tokens));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_invariance_and_prefix_sensitivity() {
        let mut a = BlockHasher::new(4);
        a.push(7, 0, 10);
        let mut b = BlockHasher::new(4);
        for t in 0..10 {
            b.push(7, t, 1);
        }
        assert_eq!(a.hashes(), b.hashes());
        assert_eq!(a.hashes().len(), 2);
        assert_eq!(a.tokens(), 10);

        // Same second-block content after a different first block: different hash.
        let mut c = BlockHasher::new(4);
        c.push(8, 0, 4);
        c.push(7, 4, 4);
        assert_ne!(c.hashes()[1], a.hashes()[1]);
        assert_ne!(c.hashes()[0], a.hashes()[0]);
    }
}
