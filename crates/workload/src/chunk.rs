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
