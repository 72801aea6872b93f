//! Properties of BlendServe's dual scanner over random orders, shapes and finishing patterns.

use prefix_tree::{Demand, OrderedRequest};
use proptest::prelude::*;
use scheduler::policy::{DualScanner, RequestShape, SideRule, StepMemory};

fn scanner(items: &[(f64, f64, f64, f64)], rule: SideRule) -> (DualScanner, Vec<RequestShape>) {
    // (compute secs, memory secs, prompt tokens, output tokens) per request, sorted densest first
    // as the tree's order would be.
    let mut order: Vec<OrderedRequest> = items
        .iter()
        .enumerate()
        .map(|(r, &(c, m, _, _))| OrderedRequest {
            request: r as u32,
            demand: Demand::new(c, m),
        })
        .collect();
    order.sort_by(|a, b| b.demand.density().total_cmp(&a.demand.density()));
    let shape: Vec<RequestShape> = items
        .iter()
        .map(|&(_, _, p, d)| RequestShape {
            prompt_tokens: p,
            prefill_tokens: p,
            output_tokens: d,
        })
        .collect();
    let memory = StepMemory {
        kv_secs_per_token: 3e-8,
        weight_secs: 3.5e-3,
    };
    (DualScanner::new(order, shape.clone(), rule, memory), shape)
}

fn items() -> impl Strategy<Value = Vec<(f64, f64, f64, f64)>> {
    prop::collection::vec(
        (1e-4f64..10.0, 1e-4f64..10.0, 1.0f64..4000.0, 1.0f64..8000.0),
        1..300,
    )
}

fn rule() -> impl Strategy<Value = SideRule> {
    prop_oneof![
        Just(SideRule::MemorySplit),
        Just(SideRule::AdmittedDemand),
        Just(SideRule::FrontOnly)
    ]
}

proptest! {
    #[test]
    fn hands_out_every_request_once(items in items(), rule in rule(), finish_every in 1usize..7, capacity in 1e3f64..1e7) {
        let (mut s, _) = scanner(&items, rule);
        let mut seen = vec![false; items.len()];
        let mut k = 0;
        while let Some(r) = s.pick(capacity) {
            prop_assert!(!std::mem::replace(&mut seen[r as usize], true), "request {} twice", r);
            k += 1;
            if k % finish_every == 0 {
                s.finished(r);
            } else if k % 5 == 0 {
                s.overran(r);
            }
        }
        prop_assert!(seen.iter().all(|&x| x));
        prop_assert_eq!(s.remaining(), 0);
    }

    #[test]
    fn memory_split_respects_each_ends_share_of_capacity(items in items(), capacity in 1e4f64..1e7, finish_every in 1usize..5) {
        let (mut s, shape) = scanner(&items, SideRule::MemorySplit);
        let mut running = Vec::new();
        loop {
            let before = s.load_kv_tokens();
            if before[0] + before[1] > capacity {
                // The cache is full by estimate: the scheduler admits no more until something
                // finishes.
                let Some(r) = running.pop() else { break };
                s.finished(r);
                continue;
            }
            let share = s.front_share(capacity);
            let Some(r) = s.pick(capacity) else { break };
            let after = s.load_kv_tokens();
            let peak = shape[r as usize].peak_kv_tokens();
            let side = usize::from(after[1] > before[1]);
            let end_share = if side == 0 { share } else { 1.0 - share };
            // An end is picked only while it is below its share of the whole cache.
            prop_assert!(after[side] <= end_share * capacity + peak + 1e-6,
                "end {} holds {} of {} (share {})", side, after[side], capacity, end_share);
            running.push(r);
            if running.len() % finish_every == 0 {
                let done = running.remove(0);
                s.finished(done);
            }
        }
    }
}
