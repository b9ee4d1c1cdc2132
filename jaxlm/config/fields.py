"""The config tree's fields: every field jaxlm reads, its default, and what it means (one
builder per section; the model section's in jaxlm/config/model_fields.py), and `base_config()`
that assembles them. Validation: jaxlm/config/checks.py."""

from __future__ import annotations

import ml_collections

from jaxlm.config.model_fields import model_fields

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config field holds a value jaxlm cannot run with; the message names the field."""


def _compute() -> ConfigDict:
  """How the model is computed: precision, layer loop, recompute, attention kernels, micro-batches.

  None of it changes the model's function or its parameters' shapes (scan_layers changes how the
  layers' parameters are stacked, not their values), so a checkpoint's architecture (`model.*`)
  never depends on how a run chose to execute it.
  """
  c = ConfigDict()
  c.param_dtype = "float32"  # master weights and optimizer state
  c.compute_dtype = "float32"  # float32 | bfloat16: activations (and matmul operands, by default)
  # "" (same as compute_dtype) | float32 | bfloat16: operands of every matmul, always accumulated in
  # float32. bfloat16 with float32 activations is mixed precision for the matmuls only; on CPU it
  # also doubles XLA's matmul rate (oneDNN bf16 kernels).
  c.matmul_dtype = ""
  c.scan_layers = True  # stack layers and run them with lax.scan: compile time independent of depth
  c.remat_policy = "none"  # none | full | dots | dots_no_batch: what the backward pass recomputes
  # Attention in training and prefill (KV-cache decoding always uses xla). MLA
  # (model.attention_kind): xla, or flash/splash with q/k and v zero-padded to one width; not cudnn.
  #   xla: plain einsum attention, the reference, any platform |
  #   flash: jaxlm's own Pallas kernels (Mosaic TPU; Mosaic GPU on Hopper; interpret mode on CPU) |
  #   splash: JAX's own TPU splash-attention kernel (TPU; interpret mode on CPU) |
  #   cudnn: jax.nn.dot_product_attention(implementation="cudnn"), GPU only, no softcap |
  #   auto: what benchmarks/attention.py measured fastest on the platform; until a measurement
  #   exists there: splash on TPU, cudnn on GPU (xla where cudnn cannot run the config), xla on CPU.
  c.attention = "xla"
  c.flash_block_q = 0  # flash: query rows per block; 0: the backend's default (TPU 512; GPU fixed 128)
  # flash: keys per block; 0: the backend's default (TPU 512; GPU 128, 64 if head_dim > 128, and
  # on GPU it sets the forward kernel's keys per step only: the backward kernels step by 64)
  c.flash_block_k = 0
  # xla attention in training/prefill: split the queries into this many blocks, each attending only
  # to the keys the causal mask lets it see (4 blocks: 10/16 of the score matrix). 1: one block.
  # (flash and splash skip hidden key blocks by themselves and ignore this.)
  c.attention_blocks = 1
  # Context parallelism (mesh.sequence > 1: every row's tokens split over the sequence axis, in the
  # balanced causal order of jaxlm/parallel/sequence.py), for compute.attention xla or flash:
  #   all_gather: each device gathers the whole row's keys/values and attends its own queries to
  #     them (flash) or XLA gathers them (xla): memory per device grows with the whole row |
  #   ring: key/value blocks travel round the sequence axis (ppermute, overlapped with each
  #     block's computation) and partial outputs merge by log-sum-exp; forward and backward
  #     memory per device is linear in seq_len / mesh.sequence (jaxlm/models/ring_attention.py).
  #     Each block pair is computed by xla or by jaxlm's flash kernels as compute.attention says
  #     ("auto": flash on TPU, xla elsewhere); splash and cudnn have no ring.
  # Ignored when mesh.sequence is 1.
  c.context_parallel = "all_gather"
  # Pipeline parallelism (mesh.stage > 1, needs scan_layers): micro-batches each step's rows are
  # split into. The schedule idles (stages - 1) / (microbatches + stages - 1) of the time, so more
  # is faster but keeps more activations. 0: 2 x stages.
  c.pipeline_microbatches = 0
  # The pipeline's schedule (jaxlm/parallel/pipeline.py):
  #   gpipe: each stage runs its layers once per micro-batch; bubble (p - 1) / (m + p - 1) |
  #   circular: the layers cut into stages x pipeline_repeats chunks, stage s holding chunks s,
  #   s + stages, ...; micro-batches go round the stages pipeline_repeats times. Bubble
  #   (p - 1) / (v m + p - 1) for m >= p, and each stage-iteration keeps only its input for the
  #   backward pass (recomputing the rest: one more forward), so far less activation memory.
  c.pipeline_schedule = "gpipe"
  # circular: chunks per stage, v (model.num_layers must divide by mesh stages x v). 1: GPipe's
  # bubble with the circular schedule's memory.
  c.pipeline_repeats = 2
  # Keep the optimizer state (Adam's two moments: twice the float32 parameters) in host memory
  # (JAX memory kind "pinned_host") instead of HBM. Each step streams it through the device: the
  # non-layer parameters' moments at once, the stacked layers' (compute.scan_layers) one layer at a
  # time in a lax.scan, so HBM holds one layer's moments, not all of them (jaxlm/train/offload.py).
  # The update is the same arithmetic; it costs host<->device traffic of 2 x the moments a step.
  # Needs mesh.stage 1.
  c.offload_optimizer = False
  return c


def _tokenizer() -> ConfigDict:
  t = ConfigDict()
  # An existing tokenizer: a SentencePiece .model, a Hugging Face tokenizer.json (its
  # tokenizer_config.json beside it names the special tokens and holds the chat template), or a
  # directory holding either (tokenizer.json first). Empty: train a SentencePiece model on the
  # training split.
  t.path = ""
  t.model_type = "bpe"  # bpe | unigram (when training)
  t.vocab_size = 4096  # pieces of a tokenizer trained here (ignored when tokenizer.path is set)
  t.byte_fallback = True  # unknown characters become UTF-8 bytes, never <unk>
  t.train_max_bytes = 20_000_000  # cap on the text fed to SentencePiece training
  t.cache_dir = ""  # where trained tokenizers are cached by content hash; empty: ~/.cache/jaxlm/tokenizers
  return t


def _data() -> ConfigDict:
  d = ConfigDict()
  # shakespeare (embedded, no download) | text | jsonl | tfds: documents for pretraining |
  # chat: JSONL examples for supervised fine-tuning, {"messages": [...]} or {"prompt", "completion"}
  # a line, packed whole into rows with only assistant/completion tokens weighted
  # (jaxlm/posttrain/sft.py; needs tokenizer.path)
  d.source = "shakespeare"
  d.train_paths = ""  # text/jsonl/chat: comma-separated files or globs for training
  d.eval_paths = ""  # text/jsonl/chat: held-out files; empty: no evaluation split
  d.jsonl_field = "text"  # jsonl: the field that holds each document
  d.tfds_name = ""  # tfds: a prepared dataset, e.g. "lm1b" or "c4/en:3.1.0"
  d.tfds_data_dir = ""  # tfds: the data_dir holding it (ArrayRecord format)
  d.tfds_train_split = "train"
  d.tfds_eval_split = "validation"
  d.tfds_text_key = "text"
  # chat: "" the tokenizer's chat template (jaxlm's default template when it has none) |
  # "default" jaxlm's default template (jaxlm/posttrain/chat.py) | a path to a .jinja template file
  d.chat_template = ""
  d.seq_len = 256  # tokens per packed row
  d.shuffle = True  # training order is shuffled with train.seed; evaluation is never shuffled
  d.prefetch_threads = 2  # grain read threads for tokenization
  # text/jsonl records that cannot be documents (undecodable UTF-8, whitespace-only, a JSONL line
  # that is not JSON or lacks a string data.jsonl_field; chat: undecodable or non-JSON-object
  # lines): "error" stops with the file and line | "skip" leaves them out and logs their count by
  # reason once at the start (metrics data/skipped_*)
  d.on_bad_record = "error"
  # Resume on another number of processes. Shakespeare/text/jsonl/chat give one global stream of
  # batches whatever the process count (each process keeps its rows of every batch), so a
  # checkpoint continues exactly on any count. tfds is read per process (process p of P reads
  # documents p, p + P, ...: no process reads the whole corpus), so its position only means
  # something on the same P; False refuses such a resume, True continues with a re-sharded stream
  # (the new processes' shares, in an order drawn anew from the step: not the batches an
  # uninterrupted run would have seen).
  d.allow_reshard = False
  return d


def _train() -> ConfigDict:
  t = ConfigDict()
  t.steps = 1000  # optimizer updates
  t.batch_size = 16  # global rows per optimizer update (over all processes and microbatches)
  t.grad_accum_steps = 1  # microbatches per update; batch_size must divide by it
  t.seed = 0  # parameters, data order and dropout-free sampling all derive from it
  t.learning_rate = 3e-3  # peak
  t.schedule = "cosine"  # cosine | linear | wsd | constant (all after linear warmup)
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  t.wsd_decay_fraction = 0.2  # wsd: the last fraction of steps that decays
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1  # decoupled (AdamW), on matrices only; see decay_embeddings
  t.decay_embeddings = False  # also decay embedding tables (norm scales and biases never decay)
  t.clip_norm = 1.0  # global gradient norm clip; 0: off
  t.z_loss = 0.0  # weight of log(Z)^2 (PaLM); keeps output logits from drifting
  # MoE models only (model.moe_num_experts > 0; jaxlm/models/moe.py), language-model objective:
  # weight of the load-balancing loss E * sum_e f_e P_e (f_e: expert e's share of the layer's
  # assignments, P_e: its mean normalized router score; 1 when balanced), summed over MoE layers,
  # over the tokens of one micro-batch (train.grad_accum_steps averages it)
  t.moe_balance_loss = 0.01
  t.moe_z_loss = 0.001  # weight of the router z-loss mean logsumexp(router logits)^2 (ST-MoE), summed over layers
  # model.moe_router=sigmoid: after each step every MoE layer's router bias moves by this toward
  # balance, bias += rate * sign(mean load - load) (DeepSeek-V3: 0.001). Not a gradient step.
  t.moe_bias_rate = 0.001
  # Tokens of the sequence per piece of the head and loss (jaxlm/train/chunked_loss.py): the float32
  # logits [rows, seq, vocab] are computed, and in the backward recomputed, one piece at a time,
  # never the whole batch's at once. Same loss and gradients (float32 summation order aside); costs
  # one more forward of the head's matmul. 0: off. Must divide data.seq_len; under sequence
  # parallelism also best divisible by mesh.sequence. The language-model objective (pretraining,
  # SFT) and eval use it; dpo/ipo/kto/reward/grpo/ppo need whole logits and ignore it.
  t.loss_chunk = 0
  t.eval_every = 0  # steps between evaluations; 0: only at the end
  t.eval_batches = 0  # batches per evaluation; 0: the whole held-out split
  t.log_every = 10  # steps between metric lines
  t.peak_tflops = 0.0  # per-device peak for MFU; 0: a table by device kind, or a matmul measure on CPU
  # metrics.jsonl, TensorBoard events, checkpoints, tokenizer copy; a local path or gs://BUCKET/PATH
  # (pip install ".[gcs]"; jaxlm/workdir.py), no other URL scheme
  t.workdir = "runs/default"
  t.progress_bar = True
  # A step whose loss, gradient norm or update is not finite is not applied (decided inside the
  # jitted step: params and optimizer state stay as they were), counted in the metrics and logged
  # with its step, the index of its global batch in the data stream.
  t.skip_nonfinite = True
  t.max_bad_steps = 10  # this many skipped steps in a row end the run (its checkpoints are kept)
  # Log a warning when the loss exceeds this many times the median of the last 100 steps; 0: off.
  t.loss_spike_factor = 0.0
  # Multi-process runs: a process that stops answering (killed, host lost) makes the others exit
  # with an error naming it after this many seconds (jax.distributed's heartbeat timeout).
  t.peer_timeout_seconds = 120
  # Multi-process start on machines with no cluster manager (every process run with
  # JAXLM_DISTRIBUTED=1): process 0's host:port, which every machine must reach; the number of
  # processes; this process's id (0 .. num_processes - 1). Unset ("", 0, -1): taken from
  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or, when those are unset too, found
  # by JAX (Cloud TPU metadata, SLURM). A value given both here and in the environment must agree.
  t.coordinator_address = ""
  t.num_processes = 0
  t.process_id = -1
  # A starting process waits this long for every other one to join, then stops saying so (rather
  # than hanging on a process that was started with another coordinator or count, or not at all).
  t.start_timeout_seconds = 300
  return t


def _checkpoint() -> ConfigDict:
  c = ConfigDict()
  c.every = 0  # steps between checkpoints; 0: only at the end
  c.keep = 3  # newest checkpoints kept
  c.async_save = True  # write in the background while training goes on
  c.resume = "auto"  # auto: resume if the workdir holds a checkpoint | always: it must | never
  # A save that fails (disk full, permission denied; an async save's failure shows at the next
  # save or at the end). stop: the run ends with a CheckpointError naming the path and the free
  # space | warn: the same text as a warning, counted in metric checkpoint/save_errors, and
  # training goes on. Either way earlier checkpoints stay readable, and a resume skips the failed
  # step's partial folder (jaxlm/checkpoint_health.py).
  c.on_save_error = "stop"
  # A jaxlm run directory (its latest checkpoint) or a Hugging Face model directory whose parameters
  # start this run: step 0, fresh optimizer state. model.* must describe the same architecture.
  # Ignored when the run resumes from its own checkpoint, except with LoRA (lora.rank > 0): there
  # it is the frozen base, read again on every start (a resume takes it from the run's config.json).
  c.init_from = ""
  return c


def _lora() -> ConfigDict:
  """LoRA: train low-rank adapters on frozen base weights (jaxlm/posttrain/lora.py).

  A training choice, not part of the architecture: `model.*` still describes the base (what
  checkpoint.init_from must match). Each targeted projection W computes with W + (alpha / rank) A B,
  A [in, rank] normal(0, 1/sqrt(fan_in)) and B [rank, out] zeros, so training starts from exactly
  the base model. Only A and B train and have optimizer state; checkpoints hold them alone, and
  the base is re-read from checkpoint.init_from (recorded in the run's config.json) on resume.
  train.* applies to the adapters as to any weights (weight_decay included: 0 is the usual LoRA
  choice).
  """
  lo = ConfigDict()
  lo.rank = 0  # 0: off (every parameter trains); r > 0: adapters of rank r, every base weight frozen
  lo.alpha = 16.0  # the update is scaled by alpha / rank (2.0 at rank 8)
  # Dropout on the adapters' input. Only 0 is implemented: a rate > 0 is refused at start-up.
  lo.dropout = 0.0
  # Comma-separated projections that get adapters, in every layer: q, k, v, o (attention: queries,
  # keys, values, output) and up, gate, down (MLP; gate only for swiglu/geglu), or the groups
  # "attn" (q,k,v,o), "mlp" (up, gate where the MLP has one, down) and "all" (both).
  lo.targets = "q,k,v,o"
  return lo


def _posttrain() -> ConfigDict:
  """What a run minimizes (jaxlm/posttrain/; README "Post-training").

  objective "lm" is next-token cross-entropy: pretraining, and SFT with data.source=chat. Every
  other objective reads JSONL records from data.train_paths / data.eval_paths in its own format
  (jaxlm/posttrain/datasets.py; data.source is then not read), one sequence a row of data.seq_len,
  and normally starts from checkpoint.init_from:
    dpo, ipo    {"prompt", "chosen", "rejected"} pairs; train.batch_size counts pairs
    kto         {"prompt", "completion", "label": true|false}; train.batch_size counts examples
    reward      {"prompt", "chosen", "rejected"} pairs: a scalar head (a reward model) trained with
                the Bradley-Terry loss; train.batch_size counts pairs
    grpo, ppo   {"prompt", "answer"?}: completions sampled from the policy, graded by
                posttrain.rewards; train.batch_size counts completions (prompts x group_size)
  """
  p = ConfigDict()
  p.objective = "lm"  # lm | dpo | ipo | kto | reward | grpo | ppo
  p.beta = 0.1  # dpo/ipo/kto: how tightly the policy is held to the reference (the loss's temperature)
  p.label_smoothing = 0.0  # dpo: assumed probability that a pair's preference is flipped (conservative DPO)
  # dpo/ipo: weight of the chosen completion's per-token NLL added to the loss (RPO); DPO alone can
  # lower the chosen answer's likelihood with the rejected one's, and greedy answers with it.
  p.rpo_alpha = 0.0
  # Where the reference model's log-probs come from (dpo/ipo/kto; grpo/ppo when kl_beta > 0):
  # "model": a frozen copy of checkpoint.init_from, sharded like the policy, run inside every step |
  # "precomputed": computed once per dataset before training (dpo/ipo/kto only; no copy is kept).
  p.reference = "model"
  p.kto_desirable_weight = 1.0  # kto: weight of desirable examples' losses
  p.kto_undesirable_weight = 1.0  # kto: weight of undesirable examples' losses
  p.reward_center = 0.0  # reward: coefficient of (r_chosen + r_rejected)^2, keeping scores near 0
  # grpo/ppo. Rewards: comma-separated names registered in jaxlm/posttrain/rewards.py, summed.
  p.rewards = "exact_match"
  p.group_size = 8  # completions sampled per prompt (GRPO's group)
  p.max_new_tokens = 16  # longest sampled completion
  p.temperature = 1.0  # sampling temperature of the rollouts
  # grpo/ppo: text that ends a sampled completion (kept as its last tokens), besides eos; "" none.
  # The addition demo stops at "\n", the end of an answer.
  p.stop = ""
  p.epsilon = 0.2  # grpo/ppo: the policy ratio is clipped to [1 - epsilon, 1 + epsilon]
  p.kl_beta = 0.0  # grpo: weight of the k3 KL to the reference; 0: no reference model is kept
  p.loss_aggregation = "token"  # grpo: "token" (mean over all tokens) | "sequence" (mean of means)
  p.updates_per_rollout = 1  # grpo/ppo: optimizer steps over each rollout batch
  p.gamma = 1.0  # ppo: discount of GAE
  p.gae_lambda = 0.95  # ppo: GAE's lambda
  p.value_coef = 0.1  # ppo: weight of the value loss
  p.value_epsilon = 0.2  # ppo: the value is clipped to old value +- value_epsilon
  p.ppo_kl_coef = 0.05  # ppo: per-token KL penalty to the reference in the rewards (needs the reference)
  return p


def _mesh() -> ConfigDict:
  """Device mesh and sharding rules; see jaxlm/parallel/mesh.py and README "Sharding"."""
  m = ConfigDict()
  # In-slice size of each mesh axis (devices joined by the fast interconnect: ICI, NVLink, one host).
  # One of them may be -1: it takes every device the others leave. Product = devices per slice.
  m.data = -1  # data parallel: parameters replicated, batch rows split
  m.stage = 1  # pipeline stages: the layer stack split over devices (see compute.pipeline_schedule)
  m.fsdp = 1  # fully sharded data parallel (ZeRO-3): batch rows AND parameters/optimizer state split
  m.sequence = 1  # sequence (context) parallel: activations split along length; see compute.context_parallel
  # expert parallel: a MoE layer's experts split over devices, tokens sent to their experts and back
  # by all-to-all (jaxlm/parallel/experts.py); everything else treats it as fsdp: batch rows and the
  # other parameters (embed and latent dimensions) are split over it. model.moe_num_experts must
  # divide by it; a dense model is just fully sharded data parallel on it.
  m.expert = 1
  m.tensor = 1  # Megatron tensor parallel: attention heads and the MLP hidden dim split
  # Cross-slice (DCN) size of each axis; the mesh axis is in-slice x cross-slice. One may be -1: it
  # takes the slices left (1 on a single slice). Without TPU slice ids, each process is a slice.
  m.dcn_data = -1
  m.dcn_stage = 1
  m.dcn_fsdp = 1
  m.dcn_sequence = 1
  m.dcn_expert = 1
  m.dcn_tensor = 1
  # Logical axis name -> mesh axes ("+" joins several), comma-separated; unlisted names are
  # replicated. One table for parameters, optimizer state, the batch and activations: within one
  # array a mesh axis is used once, by the first dimension that names it, so "embed:fsdp" shards
  # parameters (ZeRO-3) while activations [batch, length, embed] already spend fsdp on batch.
  # A parameter dimension the mesh axes do not divide (a tiny vocab) is replicated instead.
  # The expert axis shards the non-expert parameters like fsdp (a MoE's attention and embeddings
  # would otherwise be replicated on every expert rank: 40 GB a chip for DeepSeek-V3); the experts'
  # own [experts, embed, mlp] spend it on experts first. latent: MLA's low-rank dimensions.
  m.rules = ("batch:data+fsdp+expert, length:sequence, embed:fsdp+expert, latent:fsdp+expert, "
             "heads:tensor, kv_heads:tensor, mlp:tensor, vocab:tensor, layers:stage, stage:stage, "
             "experts:expert")
  return m


def _sample() -> ConfigDict:
  s = ConfigDict()
  s.prompt = "ROMEO:"  # printed at the end of training
  s.max_new_tokens = 64
  s.temperature = 0.8  # 0: greedy
  s.top_k = 0  # 0: off
  s.top_p = 1.0  # 1: off
  s.min_p = 0.0  # 0: off; keep tokens with prob >= min_p * max prob
  return s


def base_config() -> ConfigDict:
  """Every field jaxlm reads, with defaults; presets override."""
  c = ConfigDict()
  c.model = model_fields()
  c.compute = _compute()
  c.tokenizer = _tokenizer()
  c.data = _data()
  c.train = _train()
  c.checkpoint = _checkpoint()
  c.lora = _lora()
  c.posttrain = _posttrain()
  c.mesh = _mesh()
  c.sample = _sample()
  c.lock()  # a misspelt or moved field is an error at assignment, not a silently unused value
  return c


