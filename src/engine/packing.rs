//! Batch packing: a rewrite of the model's narrow first layers so that ONNX Runtime's CPU
//! convolutions stop computing padding.
//!
//! On CPUs with AVX-512, ONNX Runtime runs convolutions in a layout of blocks of 16 channels
//! (NCHWc). A layer with 8 channels still computes 16, half of them padding, and a ResNet of
//! width 8 spends much of its time in such layers at full resolution (BENCHMARKS.md, "Batch
//! packing in the engine"). Packing `P = 16 / C`
//! images into the channels of one ("batch-to-channel") makes those layers exactly one block
//! wide: the batch `[N, C, H, W]` is reshaped to `[N / P, P·C, H, W]` (image p's channels at
//! p·C..), each convolution gets block-diagonal weights (image p's outputs read only image p's
//! inputs), and the per-channel operations in between (ReLU, residual adds, pooling) are
//! unchanged. Where a packed tensor leaves the region, it is reshaped back to `[N, C, H, W]`.
//! The arithmetic per image is the same, the zero blocks add exact zeros, and the packing's
//! padding, reorders and NCHW-input kernels disappear.
//!
//! The region is grown from the first convolution whose output is narrower than a block and
//! divides it, in graph order, through convolutions of the same width and per-sample,
//! per-channel operations. Anything this module does not understand ends the region, so an
//! unusual graph is left as it is rather than rewritten wrongly. The batch must be a multiple of
//! `P`; the engine runs other batch sizes on the unpacked model.

use std::collections::{HashMap, HashSet};

use super::wire::{Field, Message, Value, WireError};

/// What the rewrite did, for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The rewritten model.
    pub model: Vec<u8>,
    /// Images per packed row: batches must be a multiple of it.
    pub factor: usize,
    /// Convolutions rewritten.
    pub convolutions: usize,
    /// Channels of those convolutions' outputs before packing.
    pub channels: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("the model does not parse: {0}")]
    Wire(#[from] WireError),
    #[error("the model has no graph")]
    NoGraph,
    #[error("tensor {0:?}: {1}")]
    Tensor(String, &'static str),
}

// ONNX field numbers (onnx.proto3).
const MODEL_OPSET_IMPORT: u32 = 8;
const MODEL_GRAPH: u32 = 7;
const OPSET_DOMAIN: u32 = 1;
const OPSET_VERSION: u32 = 2;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_OUTPUT: u32 = 12;
const GRAPH_VALUE_INFO: u32 = 13;
const NODE_INPUT: u32 = 1;
const NODE_OUTPUT: u32 = 2;
const NODE_NAME: u32 = 3;
const NODE_OP_TYPE: u32 = 4;
const NODE_ATTRIBUTE: u32 = 5;
const NODE_DOMAIN: u32 = 7;
const ATTR_NAME: u32 = 1;
const ATTR_I: u32 = 3;
const ATTR_G: u32 = 6;
const ATTR_GRAPHS: u32 = 11;
const TENSOR_DIMS: u32 = 1;
const TENSOR_DATA_TYPE: u32 = 2;
const TENSOR_FLOAT_DATA: u32 = 4;
const TENSOR_INT64_DATA: u32 = 7;
const TENSOR_NAME: u32 = 8;
const TENSOR_RAW_DATA: u32 = 9;
const TENSOR_DATA_LOCATION: u32 = 14;
const VALUE_INFO_NAME: u32 = 1;
const FLOAT: u64 = 1;
const INT64: u64 = 7;
/// Reshape takes its shape as an input from opset 5.
const MIN_OPSET: u64 = 5;
/// Regions with a single convolution do not pay for their reshapes.
const MIN_CONVOLUTIONS: usize = 2;

/// Suffix of the packed copies of tensors, weights and the new nodes' names.
const PACKED: &str = "__swav_packed";

/// Rewrites `model` so that images are packed `block / C` to a row through its narrow first
/// layers; `None` when the model has no such layers (or a form this rewrite leaves alone).
pub fn pack(model: &[u8], block: usize) -> Result<Option<Packed>, PackError> {
    let mut model_msg = Message::parse(model)?;
    if !opset_allows_reshape(&model_msg)? {
        return Ok(None);
    }
    let graph_bytes = model_msg.bytes(MODEL_GRAPH).ok_or(PackError::NoGraph)?;
    let graph = Message::parse(graph_bytes)?;
    let nodes = graph.messages(GRAPH_NODE)?.into_iter().map(Node::from_message).collect::<Result<Vec<_>, _>>()?;
    if nodes.iter().any(Node::has_subgraph) {
        return Ok(None); // a subgraph may read any tensor by name; renaming could break it
    }
    let initializers = Initializers::read(&graph)?;
    let graph_outputs: HashSet<String> =
        graph.messages(GRAPH_OUTPUT)?.iter().filter_map(|v| v.string(VALUE_INFO_NAME).ok().flatten().map(str::to_owned)).collect();

    let Some(region) = Region::grow(&nodes, &initializers, block)? else {
        return Ok(None);
    };
    if region.convolutions.len() < MIN_CONVOLUTIONS {
        return Ok(None);
    }
    let taken: HashSet<&str> = nodes.iter().flat_map(|n| n.inputs.iter().chain(&n.outputs)).map(String::as_str).collect();
    if taken.iter().any(|t| t.contains(PACKED)) || initializers.by_name.keys().any(|t| t.contains(PACKED)) {
        return Ok(None); // already packed, or names that could collide
    }
    let rewritten = region.rewrite(&nodes, &initializers, &graph_outputs)?;
    let new_graph = rebuild_graph(&graph, rewritten)?;
    for f in model_msg.fields.iter_mut().filter(|f| f.number == MODEL_GRAPH) {
        f.value = Value::Bytes(new_graph.encode());
    }
    Ok(Some(Packed {
        model: model_msg.encode(),
        factor: region.factor,
        convolutions: region.convolutions.len(),
        channels: block / region.factor,
    }))
}

fn opset_allows_reshape(model: &Message) -> Result<bool, PackError> {
    for opset in model.messages(MODEL_OPSET_IMPORT)? {
        let domain = opset.string(OPSET_DOMAIN)?.unwrap_or("");
        if domain.is_empty() || domain == "ai.onnx" {
            return Ok(opset.varint(OPSET_VERSION).unwrap_or(0) >= MIN_OPSET);
        }
    }
    Ok(false)
}

/// A node with its inputs and outputs pulled out for renaming; everything else kept verbatim.
#[derive(Debug, Clone)]
struct Node {
    inputs: Vec<String>,
    outputs: Vec<String>,
    op_type: String,
    /// Standard ONNX operator (empty or "ai.onnx" domain).
    standard: bool,
    rest: Vec<Field>,
}

impl Node {
    fn from_message(msg: Message) -> Result<Node, PackError> {
        let inputs = msg.strings(NODE_INPUT)?;
        let outputs = msg.strings(NODE_OUTPUT)?;
        let op_type = msg.string(NODE_OP_TYPE)?.unwrap_or("").to_owned();
        let domain = msg.string(NODE_DOMAIN)?.unwrap_or("");
        let standard = domain.is_empty() || domain == "ai.onnx";
        let rest = msg.fields.into_iter().filter(|f| f.number != NODE_INPUT && f.number != NODE_OUTPUT).collect();
        Ok(Node { inputs, outputs, op_type, standard, rest })
    }

    fn reshape(name: String, data: &str, shape: &str, output: &str) -> Node {
        Node {
            inputs: vec![data.to_owned(), shape.to_owned()],
            outputs: vec![output.to_owned()],
            op_type: "Reshape".into(),
            standard: true,
            rest: vec![Field::bytes(NODE_NAME, name), Field::bytes(NODE_OP_TYPE, "Reshape")],
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut fields: Vec<Field> = self.inputs.iter().map(|i| Field::bytes(NODE_INPUT, i.as_bytes())).collect();
        fields.extend(self.outputs.iter().map(|o| Field::bytes(NODE_OUTPUT, o.as_bytes())));
        fields.extend(self.rest.iter().cloned());
        Message { fields }.encode()
    }

    fn attributes(&self) -> Result<Vec<Message>, PackError> {
        let mut out = Vec::new();
        for f in self.rest.iter().filter(|f| f.number == NODE_ATTRIBUTE) {
            if let Value::Bytes(b) = &f.value {
                out.push(Message::parse(b)?);
            }
        }
        Ok(out)
    }

    fn int_attribute(&self, name: &str) -> Result<Option<i64>, PackError> {
        for a in self.attributes()? {
            if a.string(ATTR_NAME)? == Some(name) {
                return Ok(a.varint(ATTR_I).map(|v| v as i64));
            }
        }
        Ok(None)
    }

    fn has_subgraph(&self) -> bool {
        self.attributes().map_or(true, |attrs| attrs.iter().any(|a| a.bytes(ATTR_G).is_some() || a.bytes(ATTR_GRAPHS).is_some()))
    }

    fn is(&self, op: &str) -> bool {
        self.standard && self.op_type == op
    }
}

/// An initializer's shape and type, with its message for reading float values stored inline.
#[derive(Debug, Clone)]
struct Tensor {
    dims: Vec<usize>,
    data_type: u64,
    external: bool,
    message: Message,
}

impl Tensor {
    fn floats(&self, name: &str) -> Result<Vec<f32>, PackError> {
        if self.data_type != FLOAT || self.external {
            return Err(PackError::Tensor(name.into(), "not an inline float tensor"));
        }
        let count = self.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let count = count.ok_or(PackError::Tensor(name.into(), "dims overflow"))?;
        let values: Vec<f32> = match self.message.bytes(TENSOR_RAW_DATA) {
            Some(raw) => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
            None => self.message.fixed32s(TENSOR_FLOAT_DATA)?.into_iter().map(f32::from_bits).collect(),
        };
        if values.len() != count {
            return Err(PackError::Tensor(name.into(), "data does not match its dims"));
        }
        Ok(values)
    }

    fn is_scalar(&self) -> bool {
        self.dims.iter().all(|&d| d == 1)
    }
}

struct Initializers {
    by_name: HashMap<String, Tensor>,
}

impl Initializers {
    fn read(graph: &Message) -> Result<Initializers, PackError> {
        let mut by_name = HashMap::new();
        for message in graph.messages(GRAPH_INITIALIZER)? {
            let Some(name) = message.string(TENSOR_NAME)?.map(str::to_owned) else { continue };
            let dims = message.varints(TENSOR_DIMS)?.into_iter().map(|d| d as i64).collect::<Vec<_>>();
            if dims.iter().any(|&d| d < 0) {
                return Err(PackError::Tensor(name, "negative dimension"));
            }
            let tensor = Tensor {
                dims: dims.into_iter().map(|d| d as usize).collect(),
                data_type: message.varint(TENSOR_DATA_TYPE).unwrap_or(0),
                external: message.varint(TENSOR_DATA_LOCATION) == Some(1),
                message,
            };
            by_name.insert(name, tensor);
        }
        Ok(Initializers { by_name })
    }

    fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name)
    }
}

/// The packed region: which nodes run packed and each packed tensor's channel count.
struct Region {
    factor: usize,
    /// The tensor packed at the region's start and its channels.
    entry: (String, usize),
    /// Indices of the region's nodes.
    members: HashSet<usize>,
    convolutions: Vec<usize>,
    /// Channels (unpacked) of every tensor the region produces, plus the entry.
    channels: HashMap<String, usize>,
}

/// Per-sample, per-channel operations on one tensor: packing passes through them unchanged.
const UNARY: &[&str] = &["Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Clip", "Identity"];
/// Element-wise operations on two tensors of the region (or one and a scalar constant).
const BINARY: &[&str] = &["Add", "Sub", "Mul", "Div"];
/// Pooling within each channel of each sample.
const POOLS: &[&str] = &["MaxPool", "AveragePool", "LpPool"];

impl Region {
    fn grow(nodes: &[Node], inits: &Initializers, block: usize) -> Result<Option<Region>, PackError> {
        let mut region: Option<Region> = None;
        for (i, node) in nodes.iter().enumerate() {
            match region.as_mut() {
                None => {
                    if let Some((factor, c_in)) = Self::starts(node, inits, block)? {
                        let entry = (node.inputs[0].clone(), c_in);
                        let mut r = Region { factor, entry: entry.clone(), members: HashSet::new(), convolutions: Vec::new(), channels: HashMap::new() };
                        r.channels.insert(entry.0, entry.1);
                        r.admit(i, node, inits, block)?;
                        region = Some(r);
                    }
                }
                Some(r) => {
                    r.admit(i, node, inits, block)?;
                }
            }
        }
        Ok(region)
    }

    /// A convolution that can open a region: group 1, constant float weights, output narrower
    /// than a block and dividing it. Returns the factor and its input channels.
    fn starts(node: &Node, inits: &Initializers, block: usize) -> Result<Option<(usize, usize)>, PackError> {
        let Some((c_out, c_in)) = packable_conv(node, inits)? else { return Ok(None) };
        if c_out >= block || !block.is_multiple_of(c_out) || inits.get(&node.inputs[0]).is_some() {
            return Ok(None);
        }
        Ok(Some((block / c_out, c_in)))
    }

    /// Adds node `i` to the region when everything it reads is in the region (or a scalar
    /// constant) and it keeps samples and channels apart.
    fn admit(&mut self, i: usize, node: &Node, inits: &Initializers, block: usize) -> Result<(), PackError> {
        let Some(first) = node.inputs.first() else { return Ok(()) };
        let Some(&c) = self.channels.get(first) else { return Ok(()) };
        if !node.standard || node.outputs.len() != 1 {
            return Ok(());
        }
        let op = node.op_type.as_str();
        let out_channels = if op == "Conv" {
            match packable_conv(node, inits)? {
                Some((c_out, c_in)) if c_in == c && c_out * self.factor == block => {
                    self.convolutions.push(i);
                    c_out
                }
                _ => return Ok(()),
            }
        } else if UNARY.contains(&op) {
            // Clip's bounds and the like must be constants, not other tensors.
            if !node.inputs[1..].iter().all(|t| t.is_empty() || inits.get(t).is_some_and(Tensor::is_scalar)) {
                return Ok(());
            }
            c
        } else if BINARY.contains(&op) {
            let fits = |t: &String| self.channels.get(t) == Some(&c) || inits.get(t).is_some_and(Tensor::is_scalar);
            if node.inputs.len() != 2 || !node.inputs.iter().all(fits) {
                return Ok(());
            }
            c
        } else if POOLS.contains(&op) {
            if node.inputs.len() != 1 {
                return Ok(());
            }
            c
        } else {
            return Ok(());
        };
        self.members.insert(i);
        self.channels.insert(node.outputs[0].clone(), out_channels);
        Ok(())
    }

    fn rewrite(&self, nodes: &[Node], inits: &Initializers, graph_outputs: &HashSet<String>) -> Result<Rewritten, PackError> {
        let packed = |t: &str| format!("{t}{PACKED}");
        let mut new_inits = Vec::new();
        let mut replaced = HashSet::new();
        let mut shape_names = HashMap::new();
        let mut shape_for = |c: usize, new_inits: &mut Vec<Message>| -> String {
            shape_names
                .entry(c)
                .or_insert_with(|| {
                    let name = format!("swav_shape_{c}{PACKED}");
                    new_inits.push(int64_tensor(&name, &[-1, c as i64, 0, 0]));
                    name
                })
                .clone()
        };
        // Read by some node outside the region, or a graph output: needs its unpacked form back.
        let mut read_outside: HashSet<&str> = graph_outputs.iter().map(String::as_str).collect();
        for (i, node) in nodes.iter().enumerate() {
            if !self.members.contains(&i) {
                read_outside.extend(node.inputs.iter().map(String::as_str));
            }
        }

        let mut out = Vec::with_capacity(nodes.len() + 8);
        for (i, node) in nodes.iter().enumerate() {
            if !self.members.contains(&i) {
                out.push(node.clone());
                continue;
            }
            if Some(&i) == self.convolutions.first() {
                // The region's first node is the convolution that opened it, reading the entry.
                let shape = shape_for(self.entry.1 * self.factor, &mut new_inits);
                out.push(Node::reshape(format!("swav_pack{PACKED}"), &self.entry.0, &shape, &packed(&self.entry.0)));
            }
            let mut node = node.clone();
            for input in node.inputs.iter_mut() {
                if self.channels.contains_key(input) {
                    *input = packed(input);
                }
            }
            if self.convolutions.contains(&i) {
                for (k, tensor_name) in node.inputs.iter_mut().enumerate().skip(1) {
                    if tensor_name.is_empty() {
                        continue; // an omitted bias
                    }
                    let name = tensor_name.clone();
                    let tensor = inits.get(&name).ok_or(PackError::Tensor(name.clone(), "not an initializer"))?;
                    // A weight shared by two packed convolutions gets one packed copy.
                    if replaced.insert(name.clone()) {
                        let values = tensor.floats(&name)?;
                        let (dims, data) = if k == 1 { block_diagonal(&tensor.dims, &values, self.factor) } else { tiled(&values, self.factor) };
                        new_inits.push(float_tensor(&packed(&name), &dims, &data));
                    }
                    *tensor_name = packed(&name);
                }
            }
            let original = node.outputs[0].clone();
            node.outputs[0] = packed(&original);
            out.push(node);
            if read_outside.contains(original.as_str()) {
                let shape = shape_for(self.channels[&original], &mut new_inits);
                out.push(Node::reshape(format!("swav_unpack_{original}{PACKED}"), &packed(&original), &shape, &original));
            }
        }
        // The original weights stay only if something else still reads them.
        let still_read: HashSet<&str> = out.iter().flat_map(|n| n.inputs.iter().map(String::as_str)).collect();
        let dropped = replaced.into_iter().filter(|n| !still_read.contains(n.as_str())).collect();
        Ok(Rewritten { nodes: out, new_initializers: new_inits, dropped_initializers: dropped })
    }
}

/// Output and input channels of a convolution that packing can rewrite.
fn packable_conv(node: &Node, inits: &Initializers) -> Result<Option<(usize, usize)>, PackError> {
    if !node.is("Conv") || node.inputs.len() < 2 || node.int_attribute("group")?.unwrap_or(1) != 1 {
        return Ok(None);
    }
    let Some(w) = inits.get(&node.inputs[1]) else { return Ok(None) };
    // The packed tensor is reshaped as [N / P, P·C, H, W]: only 2-D convolutions fit it.
    if w.data_type != FLOAT || w.external || w.dims.len() != 4 {
        return Ok(None);
    }
    if let Some(b) = node.inputs.get(2).filter(|b| !b.is_empty()) {
        match inits.get(b) {
            Some(t) if t.data_type == FLOAT && !t.external && t.dims == [w.dims[0]] => {}
            _ => return Ok(None),
        }
    }
    Ok(Some((w.dims[0], w.dims[1])))
}

/// `[O, I, k…]` weights → `[P·O, P·I, k…]` with copy p on the diagonal block (p·O.., p·I..).
fn block_diagonal(dims: &[usize], w: &[f32], p: usize) -> (Vec<usize>, Vec<f32>) {
    let (o, i) = (dims[0], dims[1]);
    let k: usize = dims[2..].iter().product();
    let mut out = vec![0f32; p * o * p * i * k];
    for copy in 0..p {
        for oc in 0..o {
            for ic in 0..i {
                let src = (oc * i + ic) * k;
                let dst = ((copy * o + oc) * (p * i) + copy * i + ic) * k;
                out[dst..dst + k].copy_from_slice(&w[src..src + k]);
            }
        }
    }
    let mut new_dims = vec![p * o, p * i];
    new_dims.extend_from_slice(&dims[2..]);
    (new_dims, out)
}

/// A bias `[O]` → `[P·O]`, one copy per packed image.
fn tiled(b: &[f32], p: usize) -> (Vec<usize>, Vec<f32>) {
    (vec![b.len() * p], b.repeat(p))
}

fn float_tensor(name: &str, dims: &[usize], data: &[f32]) -> Message {
    let mut fields: Vec<Field> = dims.iter().map(|&d| Field::varint(TENSOR_DIMS, d as u64)).collect();
    fields.push(Field::varint(TENSOR_DATA_TYPE, FLOAT));
    fields.push(Field::bytes(TENSOR_NAME, name));
    fields.push(Field::bytes(TENSOR_RAW_DATA, data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()));
    Message { fields }
}

fn int64_tensor(name: &str, values: &[i64]) -> Message {
    let mut packed = Vec::new();
    for &v in values {
        super::wire::write_varint(&mut packed, v as u64);
    }
    Message {
        fields: vec![
            Field::varint(TENSOR_DIMS, values.len() as u64),
            Field::varint(TENSOR_DATA_TYPE, INT64),
            Field::bytes(TENSOR_INT64_DATA, packed),
            Field::bytes(TENSOR_NAME, name),
        ],
    }
}

struct Rewritten {
    nodes: Vec<Node>,
    new_initializers: Vec<Message>,
    dropped_initializers: HashSet<String>,
}

/// The graph with its nodes replaced, initializers added and dropped, and the shape hints of
/// tensors that no longer exist removed; every other field kept in place.
fn rebuild_graph(graph: &Message, rw: Rewritten) -> Result<Message, PackError> {
    let live: HashSet<&str> = rw.nodes.iter().flat_map(|n| n.inputs.iter().chain(&n.outputs)).map(String::as_str).collect();
    let mut fields = Vec::with_capacity(graph.fields.len() + rw.new_initializers.len() + 8);
    let mut nodes_written = false;
    for f in &graph.fields {
        match (f.number, &f.value) {
            (GRAPH_NODE, _) => {
                if !nodes_written {
                    fields.extend(rw.nodes.iter().map(|n| Field::bytes(GRAPH_NODE, n.encode())));
                    nodes_written = true;
                }
            }
            (GRAPH_INITIALIZER, Value::Bytes(b)) => {
                let name = Message::parse(b)?.string(TENSOR_NAME)?.map(str::to_owned);
                if !name.is_some_and(|n| rw.dropped_initializers.contains(&n)) {
                    fields.push(f.clone());
                }
            }
            (GRAPH_VALUE_INFO, Value::Bytes(b)) => {
                let info = Message::parse(b)?;
                if info.string(VALUE_INFO_NAME)?.is_some_and(|n| live.contains(n)) {
                    fields.push(f.clone());
                }
            }
            _ => fields.push(f.clone()),
        }
    }
    fields.extend(rw.new_initializers.iter().map(|t| Field::bytes(GRAPH_INITIALIZER, t.encode())));
    Ok(Message { fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_diagonal_puts_each_copy_on_its_own_block() {
        // 2 outputs × 1 input × 1×1 kernel, packed 2 to a row.
        let (dims, w) = block_diagonal(&[2, 1, 1, 1], &[5.0, 7.0], 2);
        assert_eq!(dims, vec![4, 2, 1, 1]);
        // rows: out channel; columns: in channel
        assert_eq!(w, vec![5.0, 0.0, 7.0, 0.0, 0.0, 5.0, 0.0, 7.0]);
        assert_eq!(tiled(&[1.0, 2.0], 3), (vec![6], vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0]));
    }

    #[test]
    fn block_diagonal_keeps_kernel_order() {
        let w: Vec<f32> = (0..2 * 2 * 3).map(|v| v as f32 + 1.0).collect(); // [2, 2, 3]
        let (dims, out) = block_diagonal(&[2, 2, 3], &w, 2);
        assert_eq!(dims, vec![4, 4, 3]);
        let at = |o: usize, i: usize, k: usize| out[(o * 4 + i) * 3 + k];
        for o in 0..2 {
            for i in 0..2 {
                for k in 0..3 {
                    let v = w[(o * 2 + i) * 3 + k];
                    assert_eq!(at(o, i, k), v);
                    assert_eq!(at(o + 2, i + 2, k), v);
                    assert_eq!(at(o, i + 2, k), 0.0);
                    assert_eq!(at(o + 2, i, k), 0.0);
                }
            }
        }
    }

    fn fixture_model() -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bundles/tiny-gray/model.onnx");
        std::fs::read(path).expect("fixture model")
    }

    fn nodes_of(model: &[u8]) -> Vec<Node> {
        let graph = Message::parse(Message::parse(model).unwrap().bytes(MODEL_GRAPH).unwrap()).unwrap();
        graph.messages(GRAPH_NODE).unwrap().into_iter().map(|m| Node::from_message(m).unwrap()).collect()
    }

    #[test]
    fn a_real_model_round_trips_through_the_wire_format() {
        let model = fixture_model();
        assert_eq!(Message::parse(&model).unwrap().encode(), model);
    }

    #[test]
    fn the_fixture_packs_its_stem_and_first_stage() {
        // ResNet-18 at width 4: a stem and four convolutions of 4 channels, then 8 channels.
        let model = fixture_model();
        let packed = pack(&model, 16).unwrap().expect("packed");
        assert_eq!((packed.factor, packed.convolutions, packed.channels), (4, 5, 4));
        let before = nodes_of(&model);
        let after = nodes_of(&packed.model);
        let ours = |n: &&Node| n.is("Reshape") && (n.inputs[0].contains(PACKED) || n.outputs[0].contains(PACKED));
        let reshapes: Vec<&Node> = after.iter().filter(ours).collect();
        // One reshape into rows, one back out of them where the second stage reads the first's output.
        assert_eq!(reshapes.len(), 2, "{reshapes:?}");
        assert_eq!(after.len(), before.len() + 2);
        let packed_convs = after.iter().filter(|n| n.is("Conv") && n.inputs[1].ends_with(PACKED)).count();
        assert_eq!(packed_convs, 5);
        // Every tensor a node reads is produced by an earlier node, is an initializer or the input.
        let graph = Message::parse(Message::parse(&packed.model).unwrap().bytes(MODEL_GRAPH).unwrap()).unwrap();
        let inits = Initializers::read(&graph).unwrap();
        let mut known: HashSet<String> = ["images".to_string(), String::new()].into();
        for n in &after {
            for i in &n.inputs {
                assert!(known.contains(i) || inits.get(i).is_some(), "{i} read before it exists");
            }
            known.extend(n.outputs.iter().cloned());
        }
        // The replaced weights are gone; their packed copies are 4× wider each way.
        let stem = after.iter().find(|n| n.is("Conv")).unwrap();
        assert_eq!(inits.get(&stem.inputs[1]).unwrap().dims, vec![16, 4, 3, 3]);
        assert!(inits.get(stem.inputs[1].trim_end_matches(PACKED)).is_none());
    }

    #[test]
    fn the_block_size_sets_the_factor_and_full_blocks_are_left_alone() {
        let model = fixture_model();
        let by_8 = pack(&model, 8).unwrap().expect("packed");
        assert_eq!((by_8.factor, by_8.convolutions), (2, 5));
        assert!(pack(&model, 4).unwrap().is_none(), "4 channels already fill a block of 4");
        let packed = pack(&model, 16).unwrap().unwrap();
        assert!(pack(&packed.model, 16).unwrap().is_none(), "a packed model is not packed again");
    }

    #[test]
    fn a_weight_shared_by_two_packed_convolutions_is_packed_once() {
        // Make the first stage's second convolution read the first one's weights.
        let mut model = Message::parse(&fixture_model()).unwrap();
        let mut graph = Message::parse(model.bytes(MODEL_GRAPH).unwrap()).unwrap();
        let mut nodes = nodes_of(&fixture_model());
        let inits = Initializers::read(&graph).unwrap();
        let stage: Vec<usize> = (0..nodes.len())
            .filter(|&i| nodes[i].is("Conv") && inits.get(&nodes[i].inputs[1]).unwrap().dims == [4, 4, 3, 3])
            .collect();
        let shared = nodes[stage[0]].inputs[1].clone();
        nodes[stage[1]].inputs[1] = shared.clone();
        graph.fields.retain(|f| f.number != GRAPH_NODE);
        graph.fields.extend(nodes.iter().map(|n| Field::bytes(GRAPH_NODE, n.encode())));
        for f in model.fields.iter_mut().filter(|f| f.number == MODEL_GRAPH) {
            f.value = Value::Bytes(graph.encode());
        }

        let packed = pack(&model.encode(), 16).unwrap().expect("packed");
        assert_eq!(packed.convolutions, 5);
        let graph = Message::parse(Message::parse(&packed.model).unwrap().bytes(MODEL_GRAPH).unwrap()).unwrap();
        let names: Vec<String> =
            graph.messages(GRAPH_INITIALIZER).unwrap().iter().map(|t| t.string(TENSOR_NAME).unwrap().unwrap().to_owned()).collect();
        let copies = names.iter().filter(|n| **n == format!("{shared}{PACKED}")).count();
        assert_eq!(copies, 1, "{names:?}");
        assert_eq!(names.iter().collect::<HashSet<_>>().len(), names.len(), "initializer names repeat");
    }

    #[test]
    fn only_rank_4_convolution_weights_are_packable() {
        let conv = Node { inputs: vec!["x".into(), "w".into()], outputs: vec!["y".into()], op_type: "Conv".into(), standard: true, rest: Vec::new() };
        let weight = |dims: Vec<usize>| Initializers {
            by_name: [("w".to_string(), Tensor { dims, data_type: FLOAT, external: false, message: Message { fields: Vec::new() } })].into(),
        };
        assert_eq!(packable_conv(&conv, &weight(vec![4, 2, 3, 3])).unwrap(), Some((4, 2)));
        for dims in [vec![4], vec![4, 2, 3], vec![4, 2, 3, 3, 3]] {
            assert_eq!(packable_conv(&conv, &weight(dims.clone())).unwrap(), None, "rank {} accepted", dims.len());
        }
    }

    #[test]
    fn dims_whose_product_overflows_are_an_error() {
        let t = Tensor { dims: vec![usize::MAX, 2], data_type: FLOAT, external: false, message: Message { fields: Vec::new() } };
        assert!(t.floats("w").is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(pack(b"\x0b not a model", 16).is_err());
        assert!(matches!(pack(&[], 16), Ok(None)), "no opset: left alone");
    }
}
