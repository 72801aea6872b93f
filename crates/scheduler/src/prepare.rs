//! Offline preparation shared by all policies: the prefix tree, output-length estimates and the
//! resource annotation they imply.

use std::str::FromStr;
use std::time::Instant;

use prefix_tree::{NodeId, PrefixTree, ResourceAnnotation, ROOT};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use workload::Workload;

use crate::perf::PerfModel;
use crate::SchedulerError;

/// What the scheduler may know about output lengths before running.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LengthKnowledge {
    /// The true lengths (an oracle; for ablations only).
    Known,
    /// BlendServe's estimate: run a random sample of `fraction` of the requests (at least
    /// `min_samples`), and give each request the mean output length of the sampled requests in
    /// the deepest prefix subtree holding at least `min_node_samples` of them.
    Sampled {
        fraction: f64,
        min_samples: usize,
        min_node_samples: u32,
    },
    /// Assume every request runs to `max_tokens`.
    MaxTokens,
}

impl Default for LengthKnowledge {
    fn default() -> Self {
        LengthKnowledge::Sampled {
            fraction: 0.01,
            min_samples: 64,
            min_node_samples: 4,
        }
    }
}

impl FromStr for LengthKnowledge {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "known" => Ok(LengthKnowledge::Known),
            "sampled" | "estimated" => Ok(LengthKnowledge::default()),
            "max-tokens" => Ok(LengthKnowledge::MaxTokens),
            other => {
                let fraction = other
                    .strip_prefix("sampled:")
                    .and_then(|f| f.parse::<f64>().ok())
                    .filter(|f| *f > 0.0 && *f <= 1.0)
                    .ok_or_else(|| {
                        SchedulerError::Config(format!(
                            "unknown length knowledge `{other}` (known, sampled, sampled:F, max-tokens)"
                        ))
                    })?;
                match LengthKnowledge::default() {
                    LengthKnowledge::Sampled {
                        min_samples,
                        min_node_samples,
                        ..
                    } => Ok(LengthKnowledge::Sampled {
                        fraction,
                        min_samples,
                        min_node_samples,
                    }),
                    other => Ok(other),
                }
            }
        }
    }
}

/// The tree, estimates and annotation for one workload on one performance model.
pub struct Preparation {
    pub tree: PrefixTree,
    /// Output length each request is expected to produce (what policies see).
    pub estimated_output_tokens: Vec<u32>,
    pub annotation: ResourceAnnotation,
    pub build_secs: f64,
    pub estimate_secs: f64,
    pub annotate_secs: f64,
}

impl Preparation {
    pub fn new(
        workload: &Workload,
        perf: &PerfModel,
        knowledge: LengthKnowledge,
        seed: u64,
    ) -> Preparation {
        let t0 = Instant::now();
        let tree = build_tree(workload);
        let t1 = Instant::now();
        let estimated_output_tokens = estimate_output_tokens(workload, &tree, knowledge, seed);
        let t2 = Instant::now();
        let mut preparation = Preparation::annotate(tree, perf, estimated_output_tokens);
        preparation.build_secs = (t1 - t0).as_secs_f64();
        preparation.estimate_secs = (t2 - t1).as_secs_f64();
        preparation
    }

    /// The tree and annotation for output-length estimates made elsewhere (the engine's, from
    /// a sample run it made itself).
    pub fn with_estimates(
        workload: &Workload,
        perf: &PerfModel,
        estimated_output_tokens: Vec<u32>,
    ) -> Preparation {
        assert_eq!(estimated_output_tokens.len(), workload.requests.len());
        let t0 = Instant::now();
        let tree = build_tree(workload);
        let build_secs = t0.elapsed().as_secs_f64();
        let mut preparation = Preparation::annotate(tree, perf, estimated_output_tokens);
        preparation.build_secs = build_secs;
        preparation
    }

    fn annotate(tree: PrefixTree, perf: &PerfModel, estimated_output_tokens: Vec<u32>) -> Self {
        let t0 = Instant::now();
        let annotation = ResourceAnnotation::compute(&tree, perf, &|r| {
            u64::from(estimated_output_tokens[r as usize])
        });
        Preparation {
            tree,
            estimated_output_tokens,
            annotation,
            build_secs: 0.0,
            estimate_secs: 0.0,
            annotate_secs: t0.elapsed().as_secs_f64(),
        }
    }
}

/// The prefix tree over a workload's prompts.
pub fn build_tree(workload: &Workload) -> PrefixTree {
    let prompts: Vec<&[workload::Chunk]> = workload
        .requests
        .iter()
        .map(|r| r.prompt.as_slice())
        .collect();
    PrefixTree::build(&prompts)
}

/// Which of `candidates` requests a sample run reveals: `fraction` of them, at least
/// `min_samples` (all of them if fewer), chosen at random from `seed`. Indices into the
/// candidates, in no particular order.
pub fn choose_length_sample(
    candidates: usize,
    fraction: f64,
    min_samples: usize,
    seed: u64,
) -> Vec<usize> {
    let want = ((candidates as f64 * fraction).ceil() as usize)
        .max(min_samples)
        .min(candidates);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5a3b_1e5e);
    sample(&mut rng, candidates, want).into_vec()
}

/// BlendServe's estimate from observed `(request, output tokens)` pairs: each request gets the
/// mean observed length in the deepest prefix subtree holding at least `min_node_samples`
/// observations (the root's mean at worst), clamped to `[1, max_tokens]`. With no observations,
/// `max_tokens`. A request whose output length is known ([`workload::Request::output_known`])
/// gets that length.
pub fn estimate_from_samples(
    workload: &Workload,
    tree: &PrefixTree,
    observed: &[(usize, u32)],
    min_node_samples: u32,
) -> Vec<u32> {
    let requests = &workload.requests;
    if observed.is_empty() {
        return estimate_output_tokens(workload, tree, LengthKnowledge::MaxTokens, 0);
    }
    let nodes = tree.nodes();
    let mut count = vec![0u32; nodes.len()];
    let mut sum = vec![0f64; nodes.len()];
    for &(r, tokens) in observed {
        let leaf = tree.leaf_of(r as u32) as usize;
        count[leaf] += 1;
        sum[leaf] += f64::from(tokens);
    }
    let preorder = tree.preorder();
    for &id in preorder.iter().rev() {
        if id != ROOT {
            let parent = nodes[id as usize].parent as usize;
            count[parent] += count[id as usize];
            sum[parent] += sum[id as usize];
        }
    }
    // Top-down: a node without enough samples inherits its parent's estimate.
    let mut estimate = vec![0f64; nodes.len()];
    for &id in &preorder {
        let i = id as usize;
        estimate[i] = if id == ROOT || count[i] >= min_node_samples {
            sum[i] / f64::from(count[i].max(1))
        } else {
            estimate[nodes[i].parent as usize]
        };
    }
    requests
        .iter()
        .enumerate()
        .map(|(r, req)| {
            let node: NodeId = tree.leaf_of(r as u32);
            req.known_output_tokens().unwrap_or_else(|| {
                (estimate[node as usize].round() as u32).clamp(1, req.max_tokens.max(1))
            })
        })
        .collect()
}

/// Output-length estimates under `knowledge`, each clamped to `[1, max_tokens]`.
pub fn estimate_output_tokens(
    workload: &Workload,
    tree: &PrefixTree,
    knowledge: LengthKnowledge,
    seed: u64,
) -> Vec<u32> {
    let requests = &workload.requests;
    match knowledge {
        LengthKnowledge::Known => requests.iter().map(|r| r.sim_output_tokens()).collect(),
        LengthKnowledge::MaxTokens => requests
            .iter()
            .map(|r| r.known_output_tokens().unwrap_or(r.max_tokens.max(1)))
            .collect(),
        LengthKnowledge::Sampled {
            fraction,
            min_samples,
            min_node_samples,
        } => {
            // Only requests whose length the sample run would reveal can be sampled.
            let observable: Vec<usize> = (0..requests.len())
                .filter(|&i| requests[i].output_tokens.is_some())
                .collect();
            // Requests whose length is known need no sample, and are no sample of the others
            // either (video lengths say nothing of chat answers beside them).
            let observable: Vec<usize> = observable
                .into_iter()
                .filter(|&r| !requests[r].output_known)
                .collect();
            let observed: Vec<(usize, u32)> =
                choose_length_sample(observable.len(), fraction, min_samples, seed)
                    .into_iter()
                    .map(|k| observable[k])
                    .map(|r| (r, requests[r].sim_output_tokens()))
                    .collect();
            estimate_from_samples(workload, tree, &observed, min_node_samples)
        }
    }
}
