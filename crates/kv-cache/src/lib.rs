//! Paged KV-cache block management, shared unchanged by the simulator and the engine.
//!
//! Owns: fixed-size blocks, per-sequence block tables, content hashing of full blocks (chained,
//! so a hash names a whole prefix), ref-counted sharing of cached prefix blocks, LRU eviction of
//! unreferenced cached blocks, and exact accounting of free, used and cached blocks and bytes.
//! Allocation failure is a value ([`KvError::OutOfBlocks`]), never a panic, and a failed call
//! changes nothing.
//!
//! Must not touch: GPU memory or kernels (the engine maps block ids to device memory), scheduling
//! decisions (who to preempt is the scheduler's choice), costs.

mod hash;
mod manager;

pub use hash::{BlockHash, BlockHasher};
pub use manager::{BlockId, KvCacheConfig, KvCacheManager, KvError, KvStats, KvUsage, SeqId};
