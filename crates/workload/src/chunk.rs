use serde::{Deserialize, Serialize};

/// A run of `len_tokens` prompt tokens whose content is named by `content_id`.
///
/// Two chunks with equal ids and lengths hold the same tokens. A real tokenized prompt is a
/// sequence of one-token chunks ([`Chunk::token`]); a trace prompt is a few long chunks (Mooncake's
/// 512-token hash blocks, a synthetic system prompt, a unique remainder).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Chunk {
    pub content_id: u64,
    pub len_tokens: u32,
}

/// The top byte of a content id says where the id came from, so ids from different sources
/// never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Namespace {
    /// A real token id (one-token chunk).
    Token = 0,
    /// A Mooncake prefix-block hash id (the low 48 bits), per sampling epoch (bits 48..56).
    MooncakeBlock = 1,
    /// Content that appears in exactly one request.
    Unique = 2,
    /// A synthetic shared template block (generator).
    Template = 3,
    /// A named prefix segment from the native JSONL format.
    NamedSegment = 4,
    /// Generated output tokens of one request (used by the KV cache to hash decode blocks).
    Output = 5,
}

const NAMESPACE_SHIFT: u32 = 56;
const LOW_MASK: u64 = (1 << NAMESPACE_SHIFT) - 1;

impl Namespace {
    pub fn id(self, low: u64) -> u64 {
        ((self as u64) << NAMESPACE_SHIFT) | (low & LOW_MASK)
    }

    pub fn of(content_id: u64) -> Option<Namespace> {
        Some(match content_id >> NAMESPACE_SHIFT {
            0 => Namespace::Token,
            1 => Namespace::MooncakeBlock,
            2 => Namespace::Unique,
            3 => Namespace::Template,
            4 => Namespace::NamedSegment,
            5 => Namespace::Output,
            _ => return None,
        })
    }
}

impl Chunk {
    pub fn new(content_id: u64, len_tokens: u32) -> Self {
        Chunk {
            content_id,
            len_tokens,
        }
    }

    /// A one-token chunk for a real token id.
    pub fn token(token_id: u32) -> Self {
        Chunk::new(Namespace::Token.id(u64::from(token_id)), 1)
    }
}

/// Hands out content ids for [`Namespace::Unique`] chunks; one allocator per workload keeps
/// unique chunks unique.
#[derive(Clone, Debug, Default)]
pub struct ContentIdAllocator {
    next_unique: u64,
}

impl ContentIdAllocator {
    pub fn unique(&mut self, len_tokens: u32) -> Chunk {
        let id = Namespace::Unique.id(self.next_unique);
        self.next_unique += 1;
        Chunk::new(id, len_tokens)
    }
}

/// Concrete token ids for a prompt of chunks, to run a trace on a real model: a token chunk is
/// its own id; any other chunk expands to `len_tokens` ids drawn deterministically from its
/// content id in `[first_id, vocab_size)`. Equal chunks expand to equal ids, so the trace's
/// prefix sharing survives.
pub fn materialize_token_ids(prompt: &[Chunk], first_id: u32, vocab_size: u32) -> Vec<u32> {
    let span = u64::from(vocab_size.saturating_sub(first_id).max(1));
    let mut ids = Vec::with_capacity(prompt.iter().map(|c| c.len_tokens as usize).sum());
    for c in prompt {
        if Namespace::of(c.content_id) == Some(Namespace::Token) && c.len_tokens == 1 {
            ids.push(c.content_id as u32);
            continue;
        }
        for i in 0..u64::from(c.len_tokens) {
            // splitmix64 of (content id, position).
            let mut z = c
                .content_id
                .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ids.push(first_id + (z % span) as u32);
        }
    }
    ids
}

#[cfg(test)]
mod materialize_tests {
    use super::*;

    #[test]
    fn equal_chunks_give_equal_ids_within_the_range() {
        let shared = Chunk::new(Namespace::Template.id(7), 40);
        let a = materialize_token_ids(
            &[
                shared,
                Chunk::token(5),
                Chunk::new(Namespace::Unique.id(1), 9),
            ],
            3,
            100,
        );
        let b = materialize_token_ids(&[shared, Chunk::new(Namespace::Unique.id(2), 9)], 3, 100);
        assert_eq!(a.len(), 50);
        assert_eq!(a[..40], b[..40]);
        assert_eq!(a[40], 5);
        assert_ne!(a[41..], b[40..]);
        assert!(a.iter().chain(&b).all(|&t| (3..100).contains(&t) || t == 5));
        // Ids spread over the range rather than repeating one value.
        let distinct: std::collections::HashSet<_> = a[..40].iter().collect();
        assert!(distinct.len() > 20);
    }
}
