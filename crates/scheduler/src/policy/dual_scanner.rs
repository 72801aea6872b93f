use prefix_tree::{Demand, OrderedRequest, RequestIndex};

/// BlendServe's dual scanner over a leaf order that runs from compute-heavy (front) to
/// memory-heavy (back).
///
/// One cursor walks forward from the front, the other backward from the back; each keeps the
/// prefix locality of the order it walks. Each pick takes from the front while the demand
/// admitted so far is at or below the target compute density, else from the back, so every
/// stretch of admissions mixes the two kinds at the target ratio.
///
/// The target is the density of the whole order. When that is 1 (the hardware's balance point)
/// this balances each stretch exactly; when the workload as a whole leans one way, no mix can
/// beat `max(total compute, total memory)`, and mixing at the workload's own ratio spreads the
/// scarce kind evenly so that neither end is left over as an unmixed tail.
#[derive(Clone, Debug)]
pub struct DualScanner {
    order: Vec<OrderedRequest>,
    front: usize,
    /// One past the back cursor.
    back: usize,
    target_density: f64,
    admitted: Demand,
}

impl DualScanner {
    pub fn new(order: Vec<OrderedRequest>) -> Self {
        let total: Demand = order.iter().map(|o| o.demand).sum();
        let target_density = total.density();
        let back = order.len();
        DualScanner {
            order,
            front: 0,
            back,
            target_density,
            admitted: Demand::ZERO,
        }
    }

    pub fn target_density(&self) -> f64 {
        self.target_density
    }

    pub fn remaining(&self) -> usize {
        self.back - self.front
    }

    /// Demand of everything handed out so far.
    pub fn admitted(&self) -> Demand {
        self.admitted
    }

    pub fn pick(&mut self) -> Option<RequestIndex> {
        if self.front >= self.back {
            return None;
        }
        let take_front = self.admitted.compute_secs
            <= self.target_density * self.admitted.memory_secs
            || !self.target_density.is_finite();
        let picked = if take_front {
            self.front += 1;
            self.order[self.front - 1]
        } else {
            self.back -= 1;
            self.order[self.back]
        };
        self.admitted += picked.demand;
        Some(picked.request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(request: u32, c: f64, m: f64) -> OrderedRequest {
        OrderedRequest {
            request,
            demand: Demand::new(c, m),
        }
    }

    #[test]
    fn mixes_both_ends_and_hands_out_everything_once() {
        // Compute-heavy front, memory-heavy back, total density 1.
        let order = vec![
            req(0, 3.0, 1.0),
            req(1, 3.0, 1.0),
            req(2, 1.0, 3.0),
            req(3, 1.0, 3.0),
        ];
        let mut s = DualScanner::new(order);
        assert!((s.target_density() - 1.0).abs() < 1e-12);
        let picks: Vec<u32> = std::iter::from_fn(|| s.pick()).collect();
        assert_eq!(picks, vec![0, 3, 1, 2]);
        assert_eq!(s.remaining(), 0);
        assert_eq!(s.pick(), None);
    }

    #[test]
    fn running_ratio_tracks_the_target() {
        let mut order: Vec<OrderedRequest> = (0..300).map(|i| req(i, 4.0, 1.0)).collect();
        order.extend((300..400).map(|i| req(i, 1.0, 4.0)));
        let mut s = DualScanner::new(order);
        let target = s.target_density();
        for k in 1..=400 {
            s.pick().unwrap();
            if k >= 20 {
                let d = s.admitted().density();
                assert!(
                    (d / target - 1.0).abs() < 0.35,
                    "after {k}: {d} vs {target}"
                );
            }
        }
    }
}
