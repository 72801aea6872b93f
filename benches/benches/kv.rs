//! Block allocation: admission with prefix lookup, one-token growth, and release.

use criterion::{criterion_group, criterion_main, Criterion};
use kv_cache::{BlockHasher, KvCacheConfig, KvCacheManager};

fn kv(c: &mut Criterion) {
    let config = KvCacheConfig {
        block_tokens: 16,
        num_blocks: 250_000,
        bytes_per_token: 131_072,
        enable_prefix_caching: true,
    };
    // 2000-token prompts: 1024 shared tokens (one of 8 system prompts) + unique rest.
    let hashes: Vec<Vec<kv_cache::BlockHash>> = (0..1024u64)
        .map(|i| {
            let mut h = BlockHasher::new(16);
            h.push(i % 8, 0, 1024);
            h.push(1 << 40 | i, 0, 976);
            h.hashes().to_vec()
        })
        .collect();
    c.bench_function("admit_commit_free_1024_sequences", |b| {
        let mut kv = KvCacheManager::new(config);
        b.iter(|| {
            for (i, h) in hashes.iter().enumerate() {
                let hit = kv.match_prefix(h).min(124);
                kv.admit(i as u64, h, hit, 2000 - hit as u64 * 16, 2000)
                    .expect("fits");
                kv.commit_hashes(i as u64, h).expect("exists");
            }
            for i in 0..hashes.len() {
                kv.free(i as u64).expect("exists");
            }
        })
    });
    c.bench_function("grow_one_token_1024_sequences", |b| {
        let mut kv = KvCacheManager::new(config);
        for (i, h) in hashes.iter().enumerate() {
            kv.admit(i as u64, h, 0, 2000, 2000).expect("fits");
        }
        let mut grown = 0u64;
        b.iter(|| {
            for i in 0..1024u64 {
                kv.grow(i, 1).expect("fits");
            }
            grown += 1;
            if grown == 1000 {
                // Keep the table sizes bounded: start over.
                for i in 0..1024u64 {
                    kv.free(i).expect("exists");
                    kv.admit(i, &hashes[i as usize], 0, 2000, 2000)
                        .expect("fits");
                }
                grown = 0;
            }
        })
    });
}

criterion_group!(benches, kv);
criterion_main!(benches);
