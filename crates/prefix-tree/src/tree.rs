use workload::Chunk;

/// Index of a request in the slice of prompts the tree was built from.
pub type RequestIndex = u32;
/// Index of a node in [`PrefixTree::nodes`].
pub type NodeId = u32;
/// The root: the empty prefix.
pub const ROOT: NodeId = 0;

const NO_PARENT: NodeId = NodeId::MAX;

/// A node: the prefix ending with this node's edge, shared by every request below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub parent: NodeId,
    /// Children in lexicographic order of their first chunk.
    pub children: Vec<NodeId>,
    /// A request whose prompt holds this node's edge at chunks `[parent.depth_chunks, depth_chunks)`.
    pub representative: RequestIndex,
    /// Chunks from the root to the end of this node's edge.
    pub depth_chunks: u32,
    /// Tokens on this node's edge.
    pub edge_tokens: u64,
    /// Tokens from the root to the end of this node's edge.
    pub depth_tokens: u64,
    /// Requests whose prompt ends exactly here.
    pub requests: Vec<RequestIndex>,
    /// Requests in this subtree (this node's and all descendants').
    pub subtree_requests: u32,
    /// Sum of prompt tokens of the subtree's requests (what a cache-less engine would prefill
    /// for the part of their prompts below this node's parent).
    pub subtree_prompt_tokens: u64,
    /// Distinct prompt tokens in the subtree: the sum of edge tokens of this node and all
    /// descendants (what a perfect prefix cache would prefill).
    pub subtree_unique_tokens: u64,
}

impl Node {
    /// A node before aggregation: edge and subtree figures are filled in by the builder.
    fn new(parent: NodeId, representative: RequestIndex, depth_chunks: u32) -> Node {
        Node {
            parent,
            children: Vec::new(),
            representative,
            depth_chunks,
            edge_tokens: 0,
            depth_tokens: 0,
            requests: Vec::new(),
            subtree_requests: 0,
            subtree_prompt_tokens: 0,
            subtree_unique_tokens: 0,
        }
    }

    /// Prompt tokens this subtree does not have to compute thanks to sharing, counting only
    /// tokens at or below this node's edge.
    pub fn shared_tokens(&self) -> u64 {
        let below_parent = self.subtree_prompt_tokens
            - u64::from(self.subtree_requests) * (self.depth_tokens - self.edge_tokens);
        below_parent - self.subtree_unique_tokens
    }
}

/// A radix (compressed prefix) tree over request prompts.
#[derive(Clone, Debug)]
pub struct PrefixTree {
    nodes: Vec<Node>,
    /// For each request, the node where its prompt ends.
    leaf_of: Vec<NodeId>,
}

fn lcp(a: &[Chunk], b: &[Chunk]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixTree {
    /// Builds the tree from prompts (indexed by [`RequestIndex`]). Sorting makes this
    /// O(n log n) comparisons, with no hash lookups per chunk.
    pub fn build<P: AsRef<[Chunk]> + Sync>(prompts: &[P]) -> PrefixTree {
        assert!(
            prompts.len() < RequestIndex::MAX as usize,
            "too many requests for one tree"
        );
        let mut order: Vec<RequestIndex> = (0..prompts.len() as RequestIndex).collect();
        order.sort_unstable_by(|&a, &b| {
            prompts[a as usize]
                .as_ref()
                .cmp(prompts[b as usize].as_ref())
        });

        let mut nodes = vec![Node::new(NO_PARENT, 0, 0)];
        let mut leaf_of = vec![ROOT; prompts.len()];
        let mut path: Vec<NodeId> = vec![ROOT];
        let mut previous: Option<&[Chunk]> = None;

        for &request in &order {
            let prompt = prompts[request as usize].as_ref();
            let common = previous.map_or(0, |p| lcp(p, prompt)) as u32;
            let mut last_popped = None;
            while nodes[*path.last().expect("root stays") as usize].depth_chunks > common {
                last_popped = path.pop();
            }
            let top = *path.last().expect("root stays");
            if nodes[top as usize].depth_chunks < common {
                // Split the edge of `last_popped` at `common` chunks.
                let child = last_popped.expect("a deeper node was popped");
                let middle = nodes.len() as NodeId;
                let representative = nodes[child as usize].representative;
                let mut node = Node::new(top, representative, common);
                node.children.push(child);
                nodes.push(node);
                let slot = nodes[top as usize]
                    .children
                    .iter()
                    .position(|&c| c == child)
                    .expect("child is listed under its parent");
                nodes[top as usize].children[slot] = middle;
                nodes[child as usize].parent = middle;
                path.push(middle);
            }
            let top = *path.last().expect("root stays");
            if prompt.len() as u32 == common {
                nodes[top as usize].requests.push(request);
                leaf_of[request as usize] = top;
            } else {
                let leaf = nodes.len() as NodeId;
                let mut node = Node::new(top, request, prompt.len() as u32);
                node.requests.push(request);
                nodes.push(node);
                nodes[top as usize].children.push(leaf);
                leaf_of[request as usize] = leaf;
                path.push(leaf);
            }
            previous = Some(prompt);
        }

        let mut tree = PrefixTree { nodes, leaf_of };
        tree.fill_aggregates(prompts);
        tree
    }

    /// Nodes in an order where every parent precedes its children.
    pub fn preorder(&self) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack = vec![ROOT];
        while let Some(node) = stack.pop() {
            out.push(node);
            stack.extend(self.nodes[node as usize].children.iter().rev());
        }
        out
    }

    fn fill_aggregates<P: AsRef<[Chunk]>>(&mut self, prompts: &[P]) {
        let preorder = self.preorder();
        for &id in &preorder[1..] {
            let node = &self.nodes[id as usize];
            let parent = &self.nodes[node.parent as usize];
            let start = parent.depth_chunks as usize;
            let end = node.depth_chunks as usize;
            let edge: u64 = prompts[node.representative as usize].as_ref()[start..end]
                .iter()
                .map(|c| u64::from(c.len_tokens))
                .sum();
            let depth = parent.depth_tokens + edge;
            let node = &mut self.nodes[id as usize];
            node.edge_tokens = edge;
            node.depth_tokens = depth;
        }
        for &id in preorder.iter().rev() {
            let node = &self.nodes[id as usize];
            let mut requests = node.requests.len() as u32;
            let mut prompt_tokens = node.requests.len() as u64 * node.depth_tokens;
            let mut unique = node.edge_tokens;
            for &child in &node.children {
                let c = &self.nodes[child as usize];
                requests += c.subtree_requests;
                prompt_tokens += c.subtree_prompt_tokens;
                unique += c.subtree_unique_tokens;
            }
            let node = &mut self.nodes[id as usize];
            node.subtree_requests = requests;
            node.subtree_prompt_tokens = prompt_tokens;
            node.subtree_unique_tokens = unique;
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn root(&self) -> &Node {
        &self.nodes[ROOT as usize]
    }

    /// Number of requests the tree was built from.
    pub fn requests(&self) -> usize {
        self.leaf_of.len()
    }

    /// The node where request `r`'s prompt ends.
    pub fn leaf_of(&self, r: RequestIndex) -> NodeId {
        self.leaf_of[r as usize]
    }

    /// Total prompt tokens over all requests.
    pub fn total_prompt_tokens(&self) -> u64 {
        self.root().subtree_prompt_tokens
    }

    /// Distinct prompt tokens: what a perfect prefix cache computes.
    pub fn unique_prompt_tokens(&self) -> u64 {
        self.root().subtree_unique_tokens
    }

    /// Fraction of prompt tokens that a perfect prefix cache would not compute.
    pub fn sharing_ratio(&self) -> f64 {
        let total = self.total_prompt_tokens();
        if total == 0 {
            0.0
        } else {
            1.0 - self.unique_prompt_tokens() as f64 / total as f64
        }
    }

    /// Ancestors of `node` from the root down to `node` itself.
    pub fn path_to(&self, node: NodeId) -> Vec<NodeId> {
        let mut path = Vec::new();
        let mut cur = node;
        while cur != NO_PARENT {
            path.push(cur);
            cur = self.nodes[cur as usize].parent;
        }
        path.reverse();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, len: u32) -> Chunk {
        Chunk::new(id, len)
    }

    #[test]
    fn builds_compressed_edges_and_counts_sharing() {
        let prompts = vec![
            vec![c(1, 100), c(2, 10), c(3, 5)],
            vec![c(1, 100), c(2, 10), c(4, 7)],
            vec![c(1, 100), c(9, 50)],
            vec![c(8, 20)],
            vec![c(1, 100), c(2, 10)],
        ];
        let tree = PrefixTree::build(&prompts);
        // root, [1], [2] under [1], [3], [4], [9], [8]
        assert_eq!(tree.nodes().len(), 7);
        assert_eq!(tree.total_prompt_tokens(), 115 + 117 + 150 + 20 + 110);
        assert_eq!(tree.unique_prompt_tokens(), 100 + 10 + 5 + 7 + 50 + 20);
        let n12 = tree.leaf_of(4);
        assert_eq!(tree.node(n12).depth_tokens, 110);
        assert_eq!(tree.node(n12).subtree_requests, 3);
        assert_eq!(tree.node(n12).requests, vec![4]);
        // The [2] node's subtree: prompts 0, 1, 4 below depth 100: 15 + 17 + 10 = 42 tokens,
        // 10 + 5 + 7 = 22 unique.
        assert_eq!(tree.node(n12).shared_tokens(), 20);
        assert_eq!(tree.root().subtree_requests, 5);
    }

    #[test]
    fn identical_prompts_end_at_one_node() {
        let prompts = vec![vec![c(1, 4)], vec![c(1, 4)], vec![]];
        let tree = PrefixTree::build(&prompts);
        assert_eq!(tree.leaf_of(0), tree.leaf_of(1));
        assert_eq!(tree.leaf_of(2), ROOT);
        assert_eq!(tree.unique_prompt_tokens(), 4);
        assert!((tree.sharing_ratio() - 0.5).abs() < 1e-12);
    }
}
