//! Property tests: random admit/grow/commit/free sequences never leak, double free, or let ref
//! counts drift from the block tables; failed allocations change nothing.

use kv_cache::{BlockHash, BlockHasher, KvCacheConfig, KvCacheManager, KvError};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Admit {
        seq: u64,
        prefix_group: u64,
        prompt_tokens: u64,
    },
    Grow {
        seq: u64,
        tokens: u64,
    },
    Commit {
        seq: u64,
    },
    Free {
        seq: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..12, 0u64..3, 1u64..80).prop_map(|(seq, prefix_group, prompt_tokens)| Op::Admit {
            seq,
            prefix_group,
            prompt_tokens
        }),
        (0u64..12, 1u64..20).prop_map(|(seq, tokens)| Op::Grow { seq, tokens }),
        (0u64..12).prop_map(|seq| Op::Commit { seq }),
        (0u64..12).prop_map(|seq| Op::Free { seq }),
    ]
}

fn hashes_for(group: u64, seq: u64, tokens: u64, block: u32) -> Vec<BlockHash> {
    // 32 tokens of group content, then content unique to the sequence.
    let mut h = BlockHasher::new(block);
    let shared = tokens.min(32);
    h.push(1000 + group, 0, shared);
    if tokens > shared {
        h.push(seq, 0, tokens - shared);
    }
    h.hashes().to_vec()
}

proptest! {
    #[test]
    fn random_operations_keep_invariants(ops in prop::collection::vec(op(), 1..200), blocks in 4u32..40) {
        let block = 8;
        let mut kv = KvCacheManager::new(KvCacheConfig { block_tokens: block, num_blocks: blocks, bytes_per_token: 2, enable_prefix_caching: true });
        let mut lens: std::collections::HashMap<u64, (u64, u64)> = Default::default();
        for op in ops {
            let before = kv.usage();
            match op {
                Op::Admit { seq, prefix_group, prompt_tokens } => {
                    let hashes = hashes_for(prefix_group, seq, prompt_tokens, block);
                    let hit = kv.match_prefix(&hashes).min(((prompt_tokens - 1) / u64::from(block)) as usize);
                    let new = prompt_tokens - hit as u64 * u64::from(block);
                    match kv.admit(seq, &hashes, hit, new, prompt_tokens) {
                        Ok(()) => { lens.insert(seq, (prefix_group, prompt_tokens)); }
                        Err(KvError::SequenceExists(_)) => prop_assert!(lens.contains_key(&seq)),
                        Err(KvError::OutOfBlocks { .. }) => prop_assert_eq!(kv.usage(), before),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Grow { seq, tokens } => match kv.grow(seq, tokens) {
                    Ok(()) => { if let Some(l) = lens.get_mut(&seq) { l.1 += tokens; } }
                    Err(KvError::UnknownSequence(_)) => prop_assert!(!lens.contains_key(&seq)),
                    Err(KvError::OutOfBlocks { .. }) => prop_assert_eq!(kv.usage(), before),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                },
                Op::Commit { seq } => {
                    if let Some(&(group, tokens)) = lens.get(&seq) {
                        kv.commit_hashes(seq, &hashes_for(group, seq, tokens, block)).unwrap();
                    }
                }
                Op::Free { seq } => match kv.free(seq) {
                    Ok(()) => { lens.remove(&seq); }
                    Err(KvError::UnknownSequence(_)) => prop_assert!(!lens.contains_key(&seq)),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                },
            }
            if let Err(e) = kv.check_invariants() { prop_assert!(false, "{e}"); }
            for (&seq, &(_, tokens)) in &lens {
                prop_assert_eq!(kv.sequence_tokens(seq), Some(tokens));
            }
        }
        for seq in lens.keys().copied().collect::<Vec<_>>() { kv.free(seq).unwrap(); }
        let u = kv.usage();
        prop_assert_eq!(u.used_blocks, 0);
        prop_assert_eq!(u.free_blocks + u.cached_blocks, blocks);
        kv.check_invariants().map_err(TestCaseError::fail)?;
    }
}

#[test]
fn reuses_prefix_and_evicts_lru_tail_first() {
    let block = 4;
    let mut kv = KvCacheManager::new(KvCacheConfig {
        block_tokens: block,
        num_blocks: 6,
        bytes_per_token: 10,
        enable_prefix_caching: true,
    });
    let a = hashes_for(0, 1, 16, block); // 4 blocks: 32 shared tokens cover all of them
    kv.admit(1, &a, 0, 16, 16).unwrap();
    kv.commit_hashes(1, &a).unwrap();
    kv.free(1).unwrap();
    assert_eq!(kv.usage().cached_blocks, 4);
    assert_eq!(kv.usage().cached_bytes(), 4 * 4 * 10);
    // Same content: a full hit on 3 blocks (the last token is always recomputed).
    let hit = kv.match_prefix(&a).min(3);
    assert_eq!(hit, 3);
    kv.admit(2, &a, hit, 4, 16).unwrap();
    assert_eq!(kv.stats().hit_tokens, 12);
    assert_eq!(kv.usage().used_blocks, 4);
    kv.free(2).unwrap();
    // A 5-block unrelated sequence must evict: 2 free + 3 oldest cached. The evicted ones are the
    // tail blocks of the earlier sequence, so its head stays cached.
    kv.admit(3, &hashes_for(1, 3, 20, block), 0, 20, 20)
        .unwrap();
    assert_eq!(kv.stats().evictions, 3);
    assert_eq!(kv.match_prefix(&a), 1);
    kv.check_invariants().unwrap();
}

#[test]
fn allocation_failure_is_a_value_and_changes_nothing() {
    let mut kv = KvCacheManager::new(KvCacheConfig {
        block_tokens: 16,
        num_blocks: 2,
        bytes_per_token: 1,
        enable_prefix_caching: false,
    });
    kv.admit(1, &[], 0, 20, 20).unwrap();
    let before = kv.usage();
    assert_eq!(
        kv.admit(2, &[], 0, 17, 17),
        Err(KvError::OutOfBlocks {
            needed: 2,
            available: 0
        })
    );
    assert_eq!(
        kv.grow(1, 13),
        Err(KvError::OutOfBlocks {
            needed: 1,
            available: 0
        })
    );
    assert_eq!(kv.usage(), before);
    kv.grow(1, 12).unwrap();
    assert_eq!(kv.sequence_tokens(1), Some(32));
}
