//! The BERT encoder of all-MiniLM-L6-v2, written for CPU throughput on small machines.
//!
//! It computes what candle-transformers' `BertModel` computes (same weights, same maths; a test
//! holds the two to 1e-4) with less work between the matrix multiplies, which is where much of
//! the time of a 6-layer, 384-wide model goes at sentence lengths (candle's version spent ~40 %
//! of it outside the multiplies, ~11 % in libm's scalar `erf` alone):
//! - query, key and value are one multiply (weights concatenated at load), the 1/√(head size)
//!   attention scale is folded into the query weights, and their bias is added while splitting
//!   the heads apart ([`SplitHeads`]) — one pass instead of three adds, a scale and three copies;
//! - the padding mask and the softmax are one pass ([`MaskedSoftmax`]) instead of five;
//! - each linear layer's bias, the residual connection and the LayerNorm after it are one pass
//!   ([`AddNorm`]) instead of three;
//! - the feed-forward bias and GELU are one pass ([`BiasGelu`]) with a polynomial `erf` the
//!   compiler vectorises;
//! - these passes run on rayon's pool, like the multiplies, so no core idles between them.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

/// Below this many output values an op runs on the calling thread: handing work to the pool
/// costs more than it saves.
const PARALLEL_MIN: usize = 16 * 1024;

/// A linear layer `x · Wᵀ + b` over rows of a 2-D input; the bias is added by the fused op that
/// follows the multiply.
struct Linear {
    weight: Tensor,
    bias: Vec<f32>,
}

impl Linear {
    fn load(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((outputs, inputs), "weight")?,
            bias: vb.get(outputs, "bias")?.to_vec1()?,
        })
    }

    /// `x · Wᵀ`, without the bias.
    fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.weight.t()?)
    }
}

/// LayerNorm's scale and shift.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?.to_vec1()?,
            bias: vb.get(size, "bias")?.to_vec1()?,
            eps: eps as f32,
        })
    }
}

/// The feed-forward activation.
#[derive(Clone, Copy)]
enum Activation {
    /// Exact GELU, `x·Φ(x)` (BERT's `gelu`), fused with the bias.
    Gelu,
    /// Any other activation candle has, after the bias.
    Other(HiddenAct),
}

struct Layer {
    /// Query, key and value stacked: 3 × hidden outputs, the query part pre-scaled.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

impl Layer {
    fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let hidden = config.hidden_size;
        let head_size = hidden / config.num_attention_heads;
        let attention = vb.pp("attention");
        let own = attention.pp("self");
        let get = |name: &str, shape: &[usize]| own.get(shape, name);
        // softmax(q·kᵀ / √d) = softmax((q/√d)·kᵀ): scaling the query weights once at load saves
        // a pass over every attention matrix.
        let scale = 1.0 / (head_size as f64).sqrt();
        let weight = Tensor::cat(
            &[
                (get("query.weight", &[hidden, hidden])? * scale)?,
                get("key.weight", &[hidden, hidden])?,
                get("value.weight", &[hidden, hidden])?,
            ],
            0,
        )?;
        let bias = Tensor::cat(
            &[
                (get("query.bias", &[hidden])? * scale)?,
                get("key.bias", &[hidden])?,
                get("value.bias", &[hidden])?,
            ],
            0,
        )?;
        let eps = config.layer_norm_eps;
        Ok(Self {
            qkv: Linear {
                weight,
                bias: bias.to_vec1()?,
            },
            attention_out: Linear::load(attention.pp("output.dense"), hidden, hidden)?,
            attention_norm: Norm::load(attention.pp("output.LayerNorm"), hidden, eps)?,
            intermediate: Linear::load(
                vb.pp("intermediate.dense"),
                hidden,
                config.intermediate_size,
            )?,
            output: Linear::load(vb.pp("output.dense"), config.intermediate_size, hidden)?,
            output_norm: Norm::load(vb.pp("output.LayerNorm"), hidden, eps)?,
        })
    }

    /// One encoder layer over `xs`, `(tokens, hidden)` with tokens = batch × length.
    fn forward(
        &self,
        xs: &Tensor,
        mask_bias: &Tensor,
        shape: &Heads,
        act: Activation,
    ) -> Result<Tensor> {
        let (query, key, value) = {
            let qkv = self.qkv.matmul(xs)?.apply_op1_no_bwd(&SplitHeads {
                bias: &self.qkv.bias,
                heads: *shape,
            })?;
            (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?)
        };
        let probabilities = query
            .matmul(&key.t()?)?
            .apply_op2_no_bwd(mask_bias, &MaskedSoftmax)?;
        let context = probabilities
            .matmul(&value)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((shape.batch * shape.length, shape.hidden()))?;
        let attended = self.attention_out.matmul(&context)?.apply_op2_no_bwd(
            xs,
            &AddNorm {
                bias: &self.attention_out.bias,
                norm: &self.attention_norm,
            },
        )?;
        let product = self.intermediate.matmul(&attended)?;
        let intermediate = match act {
            Activation::Gelu => product.apply_op1_no_bwd(&BiasGelu {
                bias: &self.intermediate.bias,
            })?,
            Activation::Other(other) => {
                let bias = Tensor::from_slice(
                    &self.intermediate.bias,
                    self.intermediate.bias.len(),
                    product.device(),
                )?;
                let product = product.broadcast_add(&bias)?;
                match other {
                    HiddenAct::Gelu => product.gelu_erf()?,
                    HiddenAct::GeluApproximate => product.gelu()?,
                    HiddenAct::Relu => product.relu()?,
                }
            }
        };
        self.output.matmul(&intermediate)?.apply_op2_no_bwd(
            &attended,
            &AddNorm {
                bias: &self.output.bias,
                norm: &self.output_norm,
            },
        )
    }
}

/// The attention geometry of one forward pass.
#[derive(Clone, Copy)]
struct Heads {
    batch: usize,
    length: usize,
    heads: usize,
    head_size: usize,
}

impl Heads {
    fn hidden(&self) -> usize {
        self.heads * self.head_size
    }
}

/// BERT's embeddings and encoder stack, without the pooler (sentence embeddings pool the token
/// vectors themselves).
pub(super) struct Encoder {
    word_embeddings: Tensor,
    /// Position embeddings with token type 0 added: every input here is a single segment.
    position_embeddings: Tensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    activation: Activation,
    heads: usize,
    head_size: usize,
}

impl Encoder {
    /// Loads the weights of a `BertModel` checkpoint (with or without a `bert.` prefix).
    pub(super) fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let hidden = config.hidden_size;
        if config.num_attention_heads == 0 || !hidden.is_multiple_of(config.num_attention_heads) {
            bail!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {}",
                config.num_attention_heads
            );
        }
        let embeddings = vb.pp("embeddings");
        let word_embeddings =
            embeddings.get((config.vocab_size, hidden), "word_embeddings.weight")?;
        let positions = embeddings.get(
            (config.max_position_embeddings, hidden),
            "position_embeddings.weight",
        )?;
        let token_types = embeddings.get(
            (config.type_vocab_size, hidden),
            "token_type_embeddings.weight",
        )?;
        let position_embeddings = positions.broadcast_add(&token_types.get(0)?)?;
        let embedding_norm = Norm::load(embeddings.pp("LayerNorm"), hidden, config.layer_norm_eps)?;
        let layers = (0..config.num_hidden_layers)
            .map(|index| Layer::load(vb.pp(format!("encoder.layer.{index}")), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings,
            position_embeddings,
            embedding_norm,
            layers,
            activation: match config.hidden_act {
                HiddenAct::Gelu => Activation::Gelu,
                other => Activation::Other(other),
            },
            heads: config.num_attention_heads,
            head_size: hidden / config.num_attention_heads,
        })
    }

    /// The last hidden states, `(batch, length, hidden)`, of token ids `(batch, length)`.
    /// `mask_bias` is `(batch, length)`: 0 for real tokens and a large negative number for
    /// padding, added to every attention score on a padded key.
    pub(super) fn forward(&self, ids: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let (batch, length) = ids.dims2()?;
        let shape = Heads {
            batch,
            length,
            heads: self.heads,
            head_size: self.head_size,
        };
        let hidden = shape.hidden();
        let words = self
            .word_embeddings
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((batch, length, hidden))?;
        let positions = self
            .position_embeddings
            .narrow(0, 0, length)?
            .unsqueeze(0)?
            .broadcast_as((batch, length, hidden))?
            .contiguous()?;
        let no_bias = vec![0f32; hidden];
        let mut xs = words
            .apply_op2_no_bwd(
                &positions,
                &AddNorm {
                    bias: &no_bias,
                    norm: &self.embedding_norm,
                },
            )?
            .reshape((batch * length, hidden))?;
        for layer in &self.layers {
            xs = layer.forward(&xs, mask_bias, &shape, self.activation)?;
        }
        xs.reshape((batch, length, hidden))
    }
}

/// The contiguous f32 data of a CPU tensor.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: expected f32, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// A pass that writes whole rows of an op's output.
trait Rows: Sync {
    /// Writes `rows` (a run of whole output rows), the first of which is row `first`.
    fn fill(&self, first: usize, rows: &mut [f32]);
}

/// Fills `out`, `width` values per row, with `pass`: on the rayon pool (which the matrix
/// multiplies use too) when `out` is large, so the passes between the multiplies use every core,
/// and on this thread when it is small.
fn fill_rows(out: &mut [f32], width: usize, pass: &impl Rows) {
    let arch = pulp::Arch::new();
    let rows_per_run = (PARALLEL_MIN / width.max(1)).max(1);
    if out.len() < PARALLEL_MIN {
        arch.dispatch(Run {
            pass,
            first: 0,
            rows: out,
        });
        return;
    }
    out.par_chunks_mut(rows_per_run * width)
        .enumerate()
        .for_each(|(run, rows)| {
            arch.dispatch(Run {
                pass,
                first: run * rows_per_run,
                rows,
            })
        });
}

/// One run of rows, compiled by pulp for the widest vector instructions the CPU has (AVX-512 or
/// AVX2, picked at run time): the plain loops of the passes then vectorise 16 or 8 wide rather
/// than SSE's 4. Every `fill` is `#[inline(always)]` so that it is compiled into that context.
struct Run<'a, P> {
    pass: &'a P,
    first: usize,
    rows: &'a mut [f32],
}

impl<P: Rows> pulp::WithSimd for Run<'_, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        self.pass.fill(self.first, self.rows);
    }
}

/// `(tokens, 3·hidden)` query-key-value products plus their bias, rearranged as
/// `(3, batch, heads, length, head size)` so that each head's query, key and value are contiguous
/// for the batched attention multiplies. One pass instead of a bias add and a copy.
struct SplitHeads<'a> {
    bias: &'a [f32],
    heads: Heads,
}

impl CustomOp1 for SplitHeads<'_> {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Heads {
            batch,
            length,
            heads,
            head_size,
        } = self.heads;
        let hidden = self.heads.hidden();
        if layout.shape().dims() != [batch * length, 3 * hidden] || self.bias.len() != 3 * hidden {
            bail!("split-heads: unexpected input shape {:?}", layout.shape());
        }
        let input = f32_slice(storage, layout, "split-heads input")?;
        let mut out = vec![0f32; input.len()];
        fill_rows(
            &mut out,
            head_size,
            &SplitRows {
                input,
                bias: self.bias,
                heads: self.heads,
            },
        );
        let shape = Shape::from_dims(&[3, batch, heads, length, head_size]);
        Ok((CpuStorage::F32(out), shape))
    }
}

struct SplitRows<'a> {
    input: &'a [f32],
    bias: &'a [f32],
    heads: Heads,
}

impl Rows for SplitRows<'_> {
    #[inline(always)]
    fn fill(&self, first: usize, rows: &mut [f32]) {
        let Heads {
            batch,
            length,
            heads,
            head_size,
        } = self.heads;
        let hidden = self.heads.hidden();
        // Each output row is one head's slice of one token; rows are ordered
        // (part, batch, head, position).
        for (offset, row) in rows.chunks_exact_mut(head_size).enumerate() {
            let index = first + offset;
            let position = index % length;
            let head = index / length % heads;
            let item = index / (length * heads) % batch;
            let part = index / (length * heads * batch);
            let column = part * hidden + head * head_size;
            let token = item * length + position;
            let source = &self.input[token * 3 * hidden + column..][..head_size];
            let bias = &self.bias[column..column + head_size];
            for ((out, value), bias) in row.iter_mut().zip(source).zip(bias) {
                *out = value + bias;
            }
        }
    }
}

/// Softmax over the last dimension of attention scores `(batch, heads, queries, keys)`, after
/// adding the `(batch, keys)` padding bias to every row of the batch's scores.
struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        scores: &CpuStorage,
        scores_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, queries, keys) = scores_layout.shape().dims4()?;
        if bias_layout.shape().dims() != [batch, keys] {
            bail!(
                "masked-softmax: bias shape {:?} does not match scores {:?}",
                bias_layout.shape(),
                scores_layout.shape()
            );
        }
        let scores = f32_slice(scores, scores_layout, "masked-softmax scores")?;
        let bias = f32_slice(bias, bias_layout, "masked-softmax bias")?;
        let mut out = vec![0f32; scores.len()];
        let pass = SoftmaxRows {
            scores,
            bias,
            keys,
            rows_per_item: heads * queries,
        };
        fill_rows(&mut out, keys, &pass);
        Ok((CpuStorage::F32(out), scores_layout.shape().clone()))
    }
}

struct SoftmaxRows<'a> {
    scores: &'a [f32],
    bias: &'a [f32],
    keys: usize,
    rows_per_item: usize,
}

impl Rows for SoftmaxRows<'_> {
    #[inline(always)]
    fn fill(&self, first: usize, rows: &mut [f32]) {
        let keys = self.keys;
        for (offset, out) in rows.chunks_exact_mut(keys).enumerate() {
            let index = first + offset;
            let row = &self.scores[index * keys..][..keys];
            let bias = &self.bias[index / self.rows_per_item * keys..][..keys];
            let mut max = f32::NEG_INFINITY;
            for ((out, score), bias) in out.iter_mut().zip(row).zip(bias) {
                *out = score + bias;
                max = max.max(*out);
            }
            let mut sum = 0f32;
            for value in out.iter_mut() {
                *value = (*value - max).exp();
                sum += *value;
            }
            let scale = 1.0 / sum;
            out.iter_mut().for_each(|value| *value *= scale);
        }
    }
}

/// `LayerNorm(x + bias + residual)` over rows: a linear layer's bias, BERT's residual connection
/// and the norm after it in one pass.
struct AddNorm<'a> {
    bias: &'a [f32],
    norm: &'a Norm,
}

impl CustomOp2 for AddNorm<'_> {
    fn name(&self) -> &'static str {
        "add-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = self.bias.len();
        if xs_layout.shape() != residual_layout.shape()
            || xs_layout.shape().dims().last() != Some(&width)
        {
            bail!(
                "add-norm: shapes {:?} and {:?} do not match a width of {width}",
                xs_layout.shape(),
                residual_layout.shape()
            );
        }
        let xs = f32_slice(xs, xs_layout, "add-norm input")?;
        let residual = f32_slice(residual, residual_layout, "add-norm residual")?;
        let mut out = vec![0f32; xs.len()];
        let pass = AddNormRows {
            xs,
            residual,
            bias: self.bias,
            norm: self.norm,
        };
        fill_rows(&mut out, width, &pass);
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }
}

struct AddNormRows<'a> {
    xs: &'a [f32],
    residual: &'a [f32],
    bias: &'a [f32],
    norm: &'a Norm,
}

impl Rows for AddNormRows<'_> {
    #[inline(always)]
    fn fill(&self, first: usize, rows: &mut [f32]) {
        let width = self.bias.len();
        let Norm {
            weight,
            bias: shift,
            eps,
        } = self.norm;
        for (offset, out) in rows.chunks_exact_mut(width).enumerate() {
            let start = (first + offset) * width;
            let row = self.xs[start..start + width]
                .iter()
                .zip(&self.residual[start..start + width]);
            for ((out, (x, residual)), bias) in out.iter_mut().zip(row).zip(self.bias) {
                *out = x + bias + residual;
            }
            // Two passes (mean, then variance around it) as PyTorch does: the one-pass
            // E[x²] − E[x]² loses precision when the mean is large.
            let mean = out.iter().sum::<f32>() / width as f32;
            let variance = out
                .iter()
                .map(|value| (value - mean) * (value - mean))
                .sum::<f32>()
                / width as f32;
            let scale = 1.0 / (variance + eps).sqrt();
            for ((value, weight), shift) in out.iter_mut().zip(weight).zip(shift) {
                *value = (*value - mean) * scale * weight + shift;
            }
        }
    }
}

/// `gelu(x + bias)` over rows: BERT's exact GELU, `0.5·x·(1 + erf(x/√2))`, fused with the bias
/// of the linear layer before it.
struct BiasGelu<'a> {
    bias: &'a [f32],
}

impl CustomOp1 for BiasGelu<'_> {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = self.bias.len();
        if layout.shape().dims().last() != Some(&width) {
            bail!(
                "bias-gelu: input {:?} does not match a width of {width}",
                layout.shape()
            );
        }
        let xs = f32_slice(storage, layout, "bias-gelu input")?;
        let mut out = vec![0f32; xs.len()];
        fill_rows(
            &mut out,
            width,
            &GeluRows {
                xs,
                bias: self.bias,
            },
        );
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

struct GeluRows<'a> {
    xs: &'a [f32],
    bias: &'a [f32],
}

impl Rows for GeluRows<'_> {
    #[inline(always)]
    fn fill(&self, first: usize, rows: &mut [f32]) {
        let width = self.bias.len();
        let inputs = self.xs[first * width..].chunks_exact(width);
        for (out, row) in rows.chunks_exact_mut(width).zip(inputs) {
            for ((out, x), bias) in out.iter_mut().zip(row).zip(self.bias) {
                let x = x + bias;
                *out = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

/// `erf` for f32 as a branch-free rational approximation (the one Eigen and TensorFlow use),
/// accurate to a few ULP; unlike libm's, loops over it vectorise.
#[inline(always)]
fn erf(x: f32) -> f32 {
    // Beyond ±4, erf is ±1 in single precision.
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906e-4;
    p = x2 * p + -2.954_600_2e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf to double precision, by its Taylor series (converges fast for |x| ≤ 4 in f64).
    fn reference_erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_the_series_to_float_precision() {
        let mut worst = 0f64;
        for step in -6000..=6000 {
            let x = step as f32 / 1000.0;
            let expected = if x.abs() <= 4.0 {
                reference_erf(f64::from(x))
            } else {
                f64::from(x.signum())
            };
            worst = worst.max((f64::from(erf(x)) - expected).abs());
        }
        assert!(worst < 1e-6, "worst error {worst}");
    }

    /// The whole encoder against candle-transformers' `BertModel` on the real model: the fused
    /// passes must not change the maths, padding included.
    #[test]
    fn encoder_matches_candle_transformers_bert() -> Result<()> {
        use candle_transformers::models::bert::BertModel;

        let dir = crate::workspace_models_dir().join("all-minilm-l6-v2");
        let config: Config = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).expect("config.json (make models)"),
        )
        .expect("config");
        let weights = std::fs::read(dir.join("model.safetensors")).expect("weights (make models)");
        let device = candle_core::Device::Cpu;
        let vars =
            || VarBuilder::from_slice_safetensors(&weights, candle_core::DType::F32, &device);
        let ours = Encoder::load(vars()?, &config)?;
        let theirs = BertModel::load(vars()?, &config)?;

        // Two texts, the second padded after 4 tokens.
        let ids = Tensor::new(
            &[
                [101u32, 7592, 2088, 2003, 1037, 3231, 102],
                [101, 7592, 999, 102, 0, 0, 0],
            ],
            &device,
        )?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], &device)?;
        let bias = ((mask.to_dtype(candle_core::DType::F32)? - 1.0)? * f64::from(f32::MAX))?;
        let got = ours.forward(&ids, &bias)?;
        let expected = theirs.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        // Padded positions are never pooled; compare the real tokens only.
        for (row, real) in [(0usize, 7usize), (1, 4)] {
            let got = got.get(row)?.narrow(0, 0, real)?;
            let expected = expected.get(row)?.narrow(0, 0, real)?;
            let difference = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(difference < 1e-4, "row {row} differs by {difference}");
        }
        Ok(())
    }

    #[test]
    fn split_heads_matches_reshape_and_permute() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let heads = Heads {
            batch: 2,
            length: 3,
            heads: 2,
            head_size: 4,
        };
        let xs = Tensor::arange(0f32, 2. * 3. * 24., &device)?.reshape((6, 24))?;
        let bias: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let got = xs.apply_op1_no_bwd(&SplitHeads { bias: &bias, heads })?;
        let expected = xs
            .broadcast_add(&Tensor::new(bias.as_slice(), &device)?)?
            .reshape((2, 3, 3, 2, 4))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        assert_eq!(got.dims(), expected.dims());
        let difference = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(difference, 0.0);
        Ok(())
    }

    #[test]
    fn add_norm_matches_candles_layer_norm() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let xs = Tensor::arange(0f32, 40., &device)?
            .affine(0.37, -3.0)?
            .reshape((4, 10))?;
        let residual = Tensor::arange(0f32, 40., &device)?
            .affine(-0.11, 100.0)?
            .reshape((4, 10))?;
        let bias: Vec<f32> = (0..10).map(|i| i as f32 * 0.1).collect();
        let norm = Norm {
            weight: (0..10).map(|i| 1.0 + i as f32 * 0.05).collect(),
            bias: (0..10).map(|i| i as f32 * -0.02).collect(),
            eps: 1e-12,
        };
        let got = xs.apply_op2_no_bwd(
            &residual,
            &AddNorm {
                bias: &bias,
                norm: &norm,
            },
        )?;
        let summed = (xs.broadcast_add(&Tensor::new(bias.as_slice(), &device)?)? + residual)?;
        let expected = candle_nn::ops::layer_norm_slow(
            &summed,
            &Tensor::new(norm.weight.as_slice(), &device)?,
            &Tensor::new(norm.bias.as_slice(), &device)?,
            norm.eps,
        )?;
        let difference = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(difference < 1e-4, "difference {difference}");
        Ok(())
    }

    #[test]
    fn masked_softmax_ignores_masked_keys() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let scores = Tensor::new(&[[[[1f32, 2., 3.], [0., 0., 9.]]]], &device)?;
        let bias = Tensor::new(&[[0f32, 0., f32::MIN]], &device)?;
        let expected =
            candle_nn::ops::softmax_last_dim(&Tensor::new(&[[[[1f32, 2.], [0., 0.]]]], &device)?)?;
        let got = scores
            .apply_op2_no_bwd(&bias, &MaskedSoftmax)?
            .squeeze(0)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let expected = expected.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        for (got, expected) in got.iter().zip(&expected) {
            assert_eq!(got[2], 0.0);
            assert!((got[0] - expected[0]).abs() < 1e-6 && (got[1] - expected[1]).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn bias_gelu_matches_candles_gelu_erf() -> Result<()> {
        let device = candle_core::Device::Cpu;
        let xs = Tensor::arange(-60f32, 60., &device)?
            .affine(0.1, 0.0)?
            .reshape((4, 30))?;
        let bias = Tensor::arange(0f32, 30., &device)?.affine(0.01, -0.1)?;
        let ours = xs.apply_op1_no_bwd(&BiasGelu {
            bias: &bias.to_vec1()?,
        })?;
        let theirs = xs.broadcast_add(&bias)?.gelu_erf()?;
        let difference = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(difference < 1e-6, "difference {difference}");
        Ok(())
    }
}
