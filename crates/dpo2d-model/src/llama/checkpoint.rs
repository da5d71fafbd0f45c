//! Gradient checkpointing (`gradient_checkpointing`, as TRL and transformers
//! name it): a decoder block's forward keeps only its input, and backward
//! runs the block again, with a graph, for the input's gradient and the
//! block's weights'. Activation memory drops from every block's to one
//! block's at a time, for one more forward pass of the blocks.

use super::{Block, LayerCtx};
use crate::lora::LoraRuntime;
use anyhow::Result;
use candle_core::{Tensor, Var};
use dpo2d_kernels::ops::{self, GradSink};
use std::collections::HashMap;
use std::sync::Arc;

/// One block's entry: a variable that makes backward reach the block, and
/// each variable with the sink that carries its gradient on.
type BlockVars = (Option<Tensor>, Vec<(Var, Arc<GradSink>)>);

/// What a recomputed block needs to hand its gradients on.
pub(super) struct Checkpointing {
    /// Per block: one of its variables, so that backward reaches the block
    /// even when its input takes no gradient (LoRA: frozen embeddings); and
    /// each of its variables with a sink that carries what the
    /// recomputation's own gradient store receives for it to
    /// `CausalLM::gradients` (weights whose ops send their gradients to the
    /// model's sinks never reach that store).
    blocks: Vec<BlockVars>,
    /// The same sinks by variable name.
    pub(super) sinks: HashMap<String, Arc<GradSink>>,
}

impl Checkpointing {
    pub(super) fn new(layers: usize, vars: &[(String, Var)]) -> Self {
        let mut sinks = HashMap::new();
        let blocks = (0..layers)
            .map(|i| {
                let prefix = format!("model.layers.{i}.");
                let mine: Vec<&(String, Var)> = vars.iter().filter(|(n, _)| n.starts_with(&prefix)).collect();
                let anchor = mine.first().map(|(_, v)| v.as_tensor().clone());
                let with_sinks = mine
                    .into_iter()
                    .map(|(n, v)| {
                        let sink = Arc::new(GradSink::default());
                        sinks.insert(n.clone(), sink.clone());
                        (v.clone(), sink)
                    })
                    .collect();
                (anchor, with_sinks)
            })
            .collect();
        Checkpointing { blocks, sinks }
    }

    /// Block `i`'s forward, keeping no activations for backward.
    pub(super) fn forward(&self, i: usize, block: &Arc<Block>, x: &Tensor, ctx: &LayerCtx, runtime: &Arc<LoraRuntime>) -> Result<Tensor> {
        let (Some(anchor), vars) = &self.blocks[i] else {
            return block.forward(x, ctx, None); // nothing to train in this block
        };
        // LoRA dropout draws masks: the recomputation must draw the same ones.
        let rng = runtime.rng_state();
        let y = block.forward(&x.detach(), ctx, None)?.detach();
        let (block, ctx, vars, runtime) = (block.clone(), ctx.clone(), vars.clone(), runtime.clone());
        let bwd = move |args: &[&Tensor], g: &Tensor| -> candle_core::Result<Vec<Option<Tensor>>> {
            let x = Var::from_tensor(&args[0].detach())?;
            let after = runtime.rng_state();
            runtime.set_rng_state(rng);
            let y = block.forward(x.as_tensor(), &ctx, None).map_err(|e| candle_core::Error::Msg(format!("{e:#}")));
            runtime.set_rng_state(after);
            let store = (y? * g.detach())?.sum_all()?.backward()?;
            for (v, sink) in &vars {
                if let Some(gv) = store.get(v.as_tensor()) {
                    sink.add(gv.clone())?;
                }
            }
            let dx = if args[0].track_op() { store.get(x.as_tensor()).cloned() } else { None };
            Ok(vec![dx, None])
        };
        Ok(ops::precomputed2("dpo2d-checkpoint", x, anchor, y, Box::new(bwd))?)
    }
}

#[cfg(test)]
mod tests {
    use crate::llama::tests::{ids, opts64, write_tiny};
    use crate::llama::{AttentionLayout, CausalLM, LoadOptions};
    use crate::lora::{LoraConfig, LoraTarget};
    use crate::test_support::{det, max_abs_diff};
    use candle_core::DType;

    /// Every trainable variable's gradient of a packed batch's log-probs.
    fn grads(m: &CausalLM) -> Vec<candle_core::Tensor> {
        let batch = ids(&[&[3, 7, 9, 11, 4, 6], &[5, 8, 2, 13, 0, 0]]);
        let lay = AttentionLayout::packed(&[vec![4, 2], vec![4]], 6).unwrap();
        let store = m.token_logprobs(&batch, &lay).unwrap().sum_all().unwrap().backward().unwrap();
        m.gradients(&store).unwrap().into_iter().map(|g| g.expect("every variable gets a gradient")).collect()
    }

    fn same_with_and_without(opts: &LoadOptions, qwen: bool) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), qwen, !qwen, DType::F64);
        let mut m = CausalLM::load(dir.path(), opts).unwrap();
        for (i, (n, v)) in m.trainable_vars().iter().enumerate() {
            if n.contains("lora_B") {
                v.set(&(det(v.dims(), 900 + i as u64, DType::F64) * 0.3).unwrap()).unwrap();
            }
        }
        m.set_training(true);
        let rng = m.dropout_rng_state();
        let plain = grads(&m);
        m.set_gradient_checkpointing(true);
        m.runtime.set_rng_state(rng);
        let checkpointed = grads(&m);
        assert_eq!(m.dropout_rng_state(), {
            m.runtime.set_rng_state(rng);
            m.set_gradient_checkpointing(false);
            let _ = grads(&m);
            m.dropout_rng_state()
        });
        for ((name, _), (a, b)) in m.trainable_vars().iter().zip(plain.iter().zip(&checkpointed)) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-12, "{name}: gradients differ by {d} with checkpointing");
        }
    }

    #[test]
    fn full_fine_tuning_gradients_are_unchanged() {
        // Qwen2 (biases: composed ops) and Llama (each block one fused node).
        same_with_and_without(&LoadOptions { trainable: true, ..opts64() }, true);
        same_with_and_without(&LoadOptions { trainable: true, ..opts64() }, false);
    }

    #[test]
    fn lora_with_dropout_gradients_are_unchanged() {
        let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.2, targets: LoraTarget::ALL.to_vec(), seed: 3 };
        same_with_and_without(&LoadOptions { lora: Some(lora), ..opts64() }, false);
    }
}
