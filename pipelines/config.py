"""The typed root of every job's configuration, registered with Hydra's ConfigStore.

`conf/config.yaml` composes YAML groups on top of these dataclasses, so a misspelt key or a wrong type fails at
start-up with the key's full name (`cluster.adress`, `trainer.lr`), before any cluster work begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from actors.config import EngineConfig, ModelConfig, RetrieverConfig, SandboxConfig
from agents.exsearch import ExSearchConfig
from agents.selector import SelectorConfig
from cluster.config import ClusterConfig
from pipelines.data.world import WorldConfig
from pipelines.generate import EStepConfig
from pipelines.ttpa import ReversedConfig, TTPAConfig


@dataclass
class DataConfig:
    """Which examples a job reads. `synthetic` builds the seeded world; other sources arrive with the loaders."""

    source: str = "synthetic"
    path: str | None = None
    """A dataset folder or file for non-synthetic sources (BEIR folder, QA JSONL, tool set)."""
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class ExSearchRecipeConfig:
    """ExSearch's warm start and generalized EM (pipelines/recipes/exsearch.py): `conf/recipe/exsearch.yaml`.

    Each recipe has its own schema, stored in Hydra's `recipe` group as `<name>_schema` and named first in its YAML's
    defaults, so `recipe=<name>` validates that recipe's keys and no recipe carries another's."""

    name: str = "exsearch"
    iterations: int = 2
    """EM (or preference) iterations after the warm start."""
    variants: list[str] = field(default_factory=lambda: ["importance", "uniform"])
    """M-steps run side by side from the same warm start: `importance` (weighted NLL), `uniform` (plain SFT on every
    sample), `rejection` (SFT on the samples that reached the gold answer), and the control `demonstrations` (no
    E-step: SFT on as many rows of the warm start's own demonstrations as the others train, samples and replay, with
    the same learning rate and decay), which shows how much of a gain continuing the warm start's SFT alone gives."""
    warm_start_questions: int = 300
    """Training questions whose scripted gold runs form the warm start's demonstrations."""
    warm_start_worlds: int = 6
    """Other seeded worlds whose gold runs join the demonstrations (fresh names: what teaches a tiny model to copy)."""
    warm_start_world_questions: int = 600
    """Train questions per other world."""
    warm_start_hops: list[int] = field(default_factory=list)
    """Demonstrations only of questions with these hop counts (comparisons have 2; empty = every question): ExSearch's
    premise, where the questions the loop must learn have gold answers but no demonstrations; the E-step's pool keeps
    every hop count, so only the loop can teach the others (the `demonstrations` control cannot). Measured
    (docs/results/exsearch_study.md, one run each): with `[2]` (2,564 demonstrations, 1,000-step cosine) the tiny
    policy never finds a longer chain by sampling (E-step: 0 of 280 3-hop samples and 1 of 360 4-hop reached the gold
    answer), so test EM on them stays 0 (12.7 -> 12.3, 11.3%); with `[2, 4]` (world `seed=1`) it reached the gold
    answer in 0.6% of 3-hop samples against 10-18% of 4-hop ones: it does not fill a gap between shown hop counts."""
    warm_start_steps: int = 500
    warm_start_lr: float = 1e-3
    warm_start_schedule: str = "constant"
    """The warm start's learning-rate schedule (`constant`, `linear` or `cosine` to 0 at the last step). The demo stops
    the warm start mid-way on purpose, at a constant rate, so the EM iterations have room (measured in-process, 300
    test questions: 48% at step 500 of a 1,000-step cosine, 59% at steps 750 and 1,000, where SFT levels off; a
    500-step cosine to 0 gave 7-10%, with a third of the runs malformed)."""
    mstep_lr: float = 3e-4
    """The M-step's learning rate. The M-step continues the previous policy's AdamW moments: a fresh AdamW's first
    steps move every weight by about the learning rate, and from a 21% EM warm start one M-step at 1e-3 fell to 7-8%
    (even 9 steps of rejection sampling)."""
    mstep_normalize: str = "weighted_token"
    """The M-step loss's normaliser (`trainer.normalize` values). `weighted_token` divides by sum of weight x tokens,
    so likelihood weights (mean ~0.2) set each sample's share of the step, not the step's size; uniform and rejection
    rows weigh 1, so for them it is `token`. Measured in-process from a 23% warm start with fresh E-step questions (300
    test questions): importance 23.3 -> 31.7 -> 35.0% with `weighted_token`, 26.3 -> 31.3% with `token`."""
    mstep_replay_rows: int = 0
    """Rows of the warm start's demonstrations (weight 1) trained beside every E-step's samples in each M-step
    (`with_replay`); the `demonstrations` control then trains as many more rows, so every variant takes as many steps.
    Why: the control shows that continuing the warm start's SFT gains as much as an EM iteration; with replay every
    variant gets that part, and the difference from the control is what sampling added. Measured (README, AMD, three
    warm starts, 600 rows): importance gains 11.7-18.7 points in two iterations (8.3 -> 20.0% on the default world,
    13.7% without replay), uniform 5-8 fewer, and the control as much or more (19.0, 20.0, 54.7% vs 20.0, 20.0,
    48.7%): sampling added nothing the demonstrations do not teach."""
    estep_worlds: int = 0
    """Other seeded worlds (not those of the demonstrations) whose train questions form the E-step's pool instead of
    this world's, their passages indexed beside this world's. Why: 95% of this world's pool is about entities the
    demonstrations already mention, while every test question is about unseen ones; with fresh names, a sampled run
    that reaches the gold answer shows the policy copying a name it had not been taught. Measured with 2 worlds
    (docs/results/exsearch_study.md, one run): no gain, importance 24.7 -> 24.3, 19.7% test EM, the `demonstrations`
    control 23.7, 24.7%."""
    estep_questions: int = 300
    """Training questions (disjoint from the demonstrations) sampled in each E-step, fresh every iteration while the
    train split lasts (`estep_questions` in pipelines/recipes/exsearch.py)."""
    dev_questions: int = 100
    """Held-out questions that decide whether an iteration's checkpoint is kept."""
    eval_questions: int = 300
    """Held-out test questions of the results table."""
    keep_best: bool = True
    """Keep an iteration's checkpoint only if dev EM did not fall (the loop is unstable at a constant LR)."""
    agent: ExSearchConfig = field(default_factory=ExSearchConfig)
    estep: EStepConfig = field(default_factory=EStepConfig)


@dataclass
class ToolRetRecipeConfig:
    """Contrastive fine-tuning of the embedder for tool retrieval (pipelines/recipes/toolret.py):
    `conf/recipe/toolret.yaml`. Ray Train workers take their CPU share and placement from `trainer.*`."""

    name: str = "toolret"
    source: str = "auto"
    """`shared` (the tool sets under `shared_root`), `synthetic` (the world's tool tasks) or `auto` (shared when
    `shared_root/tools` exists)."""
    shared_root: str | None = None
    """The shared data folder holding tools/; empty = ../shared/data beside the repo."""
    datasets: list[str] = field(default_factory=lambda: ["apibench_tensorflowhub", "apibench_torchhub",
                                                         "apibench_huggingface"])  # fmt: skip
    """Tool sets (pipelines/data/toolsets.py TOOL_TASKS) trained on together and evaluated one by one."""
    test_tool_fraction: float = 0.25
    """Share of each dataset's tools held out with their queries: the `unseen_tools` test group."""
    test_query_fraction: float = 0.25
    """Share of the remaining queries held out: the `seen_tools` test group."""
    max_train_queries: int = 300
    """Training queries per dataset (a seeded sample)."""
    max_test_queries: int = 120
    """Test queries per dataset and test group."""
    hard_negatives: int = 1
    """Mined hard negatives per training pair (from the untrained retriever's ranking)."""
    mine_depth: int = 10
    """Hard negatives are drawn from this many top non-relevant hits."""
    steps: int = 60
    batch_size: int = 32
    """Pairs per optimizer step over all workers (fewer when the tools cannot fill it with true negatives)."""
    num_workers: int = 2
    """Ray Train workers of the embedder's training (its policy counterpart is trainer.num_workers)."""
    lr: float = 3e-5
    lr_schedule: str = "linear"
    warmup_steps: int = 4
    weight_decay: float = 0.01
    temperature: float = 0.05
    max_seq_length: int = 128
    """Encoder truncation in evaluation (tool documents average ~160 MiniLM tokens; measured on these sets, the
    untrained MiniLM scores as well with 128 as with 256, at half the cost)."""
    train_max_seq_length: int = 64
    """Encoder truncation in training: a tool document's name and description come first, and a training step costs
    about half as much at 64 tokens as at 128."""
    freeze_embeddings: bool = False
    checkpoint_every: int = 0
    report_every: int = 10
    instructions: bool = True
    """Also evaluate with each dataset's instruction (`Instruct: ...\\nQuery: ...`); training never uses them."""
    depth: int = 100
    eval_batch_size: int = 64
    eval_cpus: float = 1.0
    """CPUs per evaluation task (one per dataset and encoder, run side by side)."""
    eval_timeout_s: float = 1800.0


@dataclass
class DRORecipeConfig:
    """DRO's warm start and EM over document permutations (pipelines/recipes/dro.py): `conf/recipe/dro.yaml`."""

    name: str = "dro"
    iterations: int = 2
    """EM iterations after the warm start."""
    warm_start_questions: int = 300
    """Training questions (single-hop, from the world's decompositions) whose scripted selection and answer form the
    warm start's SFT rows."""
    warm_start_worlds: int = 4
    """Other seeded worlds whose scripted rows join the warm start (fresh names: what teaches a tiny model to copy)."""
    warm_start_world_questions: int = 300
    """Single-hop train questions per other world."""
    warm_start_steps: int = 800
    warm_start_lr: float = 1e-3
    warm_start_schedule: str = "cosine"
    """The warm start's learning-rate schedule (`constant`, `linear` or `cosine`)."""
    warm_start_selection: str = "gold"
    """What the warm start's selector rows write: `gold` (the passage that states the answer, first: relevance
    labels) or `random` (a seeded random permutation: the format only, so the selector starts at chance and learns
    relevance from the generator's likelihood alone; `conf/recipe/dro.yaml` picks it: from gold labels the selector
    sat at Recall@1 ~0.33 and no M-step moved it). The generator rows always answer from the gold passage."""
    estep_questions: int = 200
    """Training questions (disjoint from the warm start's) sampled in each E-step, fresh every iteration while the
    train split lasts."""
    estep_worlds: int = 0
    """Other seeded worlds whose single-hop train questions join each E-step (`estep_world_questions` each), new
    worlds every iteration: question-answer pairs are all the E-step needs, and one world has too few of them."""
    estep_world_questions: int = 300
    mstep_lr: float = 3e-4
    """The M-step's learning rate; the M-step continues the previous policy's AdamW moments, as ExSearch's does."""
    mstep_epochs: int = 1
    mstep_continue_optimizer: bool = True
    """Start each M-step from the previous policy's AdamW moments (as ExSearch does) rather than a fresh AdamW."""
    mstep_normalize: str = "weighted_token"
    """The M-step loss's normaliser (`trainer.normalize` values): `weighted_token` lets the softmax weights set each
    permutation's share of the step, not the step's size."""
    mstep_generator_weight: float = 1.0
    """Multiplies the generator rows' importance weights in the M-step (the selector's stay): how much of each step
    teaches answering, against choosing."""
    mstep_passes: list[str] = field(default_factory=lambda: ["all"])
    """The M-step's passes, each a Ray Train run from the previous pass's checkpoint on the rows of its targets:
    `all` (DRO's joint objective in one run), `selector` or `generator` (only those rows); e.g. `[selector, all]`."""
    mstep_min_weight: float = 0.0
    """Rows weighing less than this times the heaviest E-step row are left out of the M-step. They add nothing to the
    weighted loss, but they fill batch places: with likelihood weights most sampled permutations weigh ~0, so a batch
    of 16 held ~4 rows that trained, and each step was as noisy as a batch of 4."""
    dev_questions: int = 60
    """Held-out questions that decide whether an iteration's checkpoint is kept."""
    eval_questions: int = 150
    """Held-out test questions of the results table."""
    keep_best: bool = True
    """Keep an iteration's checkpoint only if dev Recall@K + EM did not fall."""
    shuffle_candidates: bool = True
    """Show the retriever's top N in a seeded per-question order, so the retriever's ranking is no hint."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    estep: EStepConfig = field(default_factory=EStepConfig)


@dataclass
class TTPARecipeConfig:
    """TTPA: reversed construction -> SFT -> token-level pairs -> `token_dpo` (pipelines/recipes/ttpa.py):
    `conf/recipe/ttpa.yaml`."""

    name: str = "ttpa"
    rounds: int = 1
    """Preference rounds (pairs from the current policy, then `token_dpo`) after the SFT."""
    train_tasks: int = 300
    """Tasks built by reversed construction on the world's train split (each cut into turns)."""
    train_worlds: int = 0
    """Other seeded worlds (same sizes, other names) whose reversed tasks join the training tasks, `train_tasks`
    each: a tiny model copies names it never saw only after copying many different ones."""
    test_tasks: int = 200
    """Held-out tasks of the results table."""
    test_entities: str = "test"
    """`test`: held-out tasks on the test split's entities (names the policy never saw); `train`: new tasks on the
    train split's entities (chains, phrasings and attributes the policy never saw, names it did)."""
    sft_steps: int = 300
    sft_lr: float = 3e-3
    dpo_lr: float = 1e-4
    dpo_beta: float = 1.0
    """DPO's beta. At 0.1 the loss keeps pushing the rejected tokens down for ~30 nats of margin, and on the tiny
    policy every rate that moved accuracy (1e-4, 3e-4) also broke the call format (malformed calls 122 -> 203-274 of
    358 held-out turns); at 1.0 the margin saturates after a few nats."""
    dpo_epochs: int = 1
    dpo_steps: int = -1
    """Stop token_dpo after this many steps (-1 = run `dpo_epochs` over the pairs)."""
    dpo_rpo_alpha: float = 0.0
    """token_dpo + alpha x NLL of the chosen (gold) completions (`trainer.rpo_alpha`)."""
    micro_batch_size: int = 4
    """Sequences per forward pass in SFT and token_dpo (instead of trainer.micro_batch_size): a padded micro-batch
    wastes less on the long turns."""
    pair_turns: int = 300
    """Turns to build pairs on per round (0 = all)."""
    pair_split: str = "dev"
    """Where the pairs' turns come from: `train` (the SFT's own turns) or `dev` (reversed tasks on the dev split's
    entities, which the SFT never saw; the test split's stay unseen)."""
    pair_tasks: int = 300
    """Reversed tasks built for the pairs when `pair_split` is not `train`."""
    reversed: ReversedConfig = field(default_factory=ReversedConfig)
    pairs: TTPAConfig = field(default_factory=TTPAConfig)


@dataclass
class TrainerConfig:
    """Ray Train settings shared by every objective (pipelines/train.py)."""

    objective: str = "sft"
    """`sft`, `weighted_nll`, `dpo` or `token_dpo` (pipelines/objectives.py)."""
    normalize: str = "token"
    """NLL objectives: average over the global batch's masked tokens (`token`), over its weighted tokens
    (`weighted_token`: sum of weight x tokens, self-normalised importance weights) or over sequences (`sequence`)."""
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    """Fractional CPUs: a Ray Data stream feeding whole-CPU workers on a 2-core node deadlocks."""
    use_gpu: bool = False
    placement_strategy: str = "PACK"
    """Ray placement of the worker group: `PACK` (fewest nodes) or `SPREAD` (one per node where possible)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per worker besides CPU/GPU, e.g. `{gpu_node: 0.01}` (cluster/resources.py)."""
    accelerator_type: str | None = None
    """Only on nodes with this GPU type (ScalingConfig's `accelerator_type`, e.g. `A100`); empty = any."""
    lr: float = 2e-3
    lr_schedule: str = "linear"
    """`constant`, `linear` (decay to 0) or `cosine`, after `warmup_steps`."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 16
    """Sequences (or pairs) per optimizer step across all workers: the same training whatever the worker count."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one worker; gradient accumulation covers the rest of the batch."""
    epochs: int = 1
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = run all epochs)."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    """Preference objectives: + alpha x NLL of the chosen completions (TRL's `rpo_alpha`; 0 = plain DPO)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    report_every: int = 50
    """Send metrics to Ray Train every N steps (each report waits for the controller; the CSV still has every step)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails."""
    resume: bool = False
    """Continue the run in the output folder from its last checkpoint."""
    precision: str = "fp32"
    """`fp32` or `bf16` (autocast)."""
    threads: int = 1
    seed: int = 0


@dataclass
class ServeScalingConfig:
    """Replicas of one Serve deployment: a fixed number, or autoscaled from `num_replicas` up to `max_replicas`."""

    num_replicas: int = 1
    max_replicas: int = 1
    """Above `num_replicas`, Serve autoscales between the two on queued + running requests per replica."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target: requests in flight per replica that Serve tries to keep."""
    max_ongoing_requests: int = 64
    """Requests one replica takes at once; more wait in the caller's queue (never dropped)."""


@dataclass
class ServeConfig:
    """Ray Serve application settings (pipelines/serve.py): what is deployed, limits, keys and scaling."""

    run: bool = False
    """Deploy the trained agent at the end of the main job."""
    host: str = "127.0.0.1"
    """Where Serve's HTTP proxy listens; 0.0.0.0 to accept other machines (then keep API keys on)."""
    port: int = 8000
    app_name: str = "toolseek"
    model_name: str = "toolseek-policy"
    """The `model` clients name in /v1/chat/completions; any other name is a 404."""
    require_api_key: bool = True
    """Bearer keys on every /v1 endpoint. Keys come from `api_keys_file` (one per line) and TOOLSEEK_API_KEYS
    (comma-separated), read when the app is built."""
    api_keys_file: str | None = None
    admin_keys_file: str | None = None
    """Keys allowed to hot-swap the checkpoint (also TOOLSEEK_ADMIN_KEYS); none = the admin endpoint is off."""
    rate_limit_per_minute: int = 600
    """Requests per key per minute, per ingress replica (a token bucket); 0 = no limit."""
    rate_limit_burst: int = 60
    max_request_bytes: int = 1_000_000
    """Larger bodies get 413 before they are parsed."""
    max_tokens_limit: int = 512
    """Largest max_tokens a request may ask for (per completion)."""
    default_max_tokens: int = 128
    max_n: int = 4
    """Most completions one chat request may ask for."""
    max_queries: int = 64
    """Most queries one /v1/retrieve request may carry."""
    max_k: int = 100
    cors_origins: list[str] = field(default_factory=list)
    """Origins allowed by CORS; empty = no CORS headers (browsers on other origins are refused)."""
    request_timeout_s: float = 120.0
    """Deadline of every call the ingress makes to a deployment, and of the HTTP proxy's whole request."""
    batch_max_size: int = 16
    """@serve.batch in the LLM deployment: most single-prompt requests grouped into one engine call."""
    batch_wait_ms: float = 5.0
    """How long the first request of a batch waits for others to join it."""
    agents: list[str] = field(default_factory=lambda: ["exsearch", "genground", "conagents"])
    """Agents served at /v1/agents/{name}/runs."""
    max_agent_runs: int = 4
    """Agent runs one ingress replica runs at once (each is a thread driving the deployments)."""
    retriever: str = "auto"
    """`auto`: `retriever.index_dir`, else an index built from the synthetic world's passages; `none`: no retriever
    deployment (then /v1/retrieve and the search agents answer 503)."""
    reload_timeout_s: float = 300.0
    """How long a hot swap waits for every LLM replica to load the new weights."""
    llm: ServeScalingConfig = field(default_factory=ServeScalingConfig)
    ingress: ServeScalingConfig = field(default_factory=lambda: ServeScalingConfig(max_ongoing_requests=256))
    retrieval: ServeScalingConfig = field(default_factory=ServeScalingConfig)
    sandbox: ServeScalingConfig = field(default_factory=ServeScalingConfig)
    ingress_num_cpus: float = 0.1
    """CPUs reserved per ingress replica (it parses, tokenizes and waits; the engine does the work)."""
    access_log: bool = True
    """Serve's per-request log lines in every replica (off saves CPU on small machines; errors are logged anyway)."""


@dataclass
class ToolSeekConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Any = MISSING
    """The method being run: `conf/recipe/<name>.yaml`, typed by its own schema (see RECIPE_SCHEMAS)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    output_dir: str | None = None
    """Where a job writes; empty = Hydra's run directory (outputs/<date>/<time>)."""
    seed: int = 0


SCHEMA_NAME = "toolseek_schema"


RECIPE_SCHEMAS: dict[str, type] = {"exsearch": ExSearchRecipeConfig, "toolret": ToolRetRecipeConfig, "dro": DRORecipeConfig,
                                  "ttpa": TTPARecipeConfig}
"""Recipe name -> its schema. A new recipe adds its dataclass here and `defaults: [<name>_schema, _self_]` to its YAML."""


def register_configs() -> None:
    """Make the schemas known to Hydra; `conf/config.yaml` lists the root first in its defaults."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=ToolSeekConfig)
    for name, schema in RECIPE_SCHEMAS.items():
        store.store(group="recipe", name=f"{name}_schema", node=schema)


register_configs()


@dataclass
class EvaluateConfig:
    """What `python -m pipelines.evaluate` measures (retrieval today; QA and tool calls share the job later)."""

    use_instructions: bool = False
    """Retrieval: send each query's instruction with it (`Instruct: ...\\nQuery: ...` for dense, prepended for BM25)."""
    split: str = "test"
    """Which qrels split of a BEIR folder, or which questions of the synthetic world."""
    max_queries: int | None = None
    """Evaluate at most this many queries (evenly spaced over the task, deterministic); empty = all of them."""
    depth: int = 100
    """Hits retrieved per query: the run file's depth and the deepest cut-off of the metrics."""
    query_batch_size: int = 256
    """Queries per search call to the Retriever actors (each call has retriever.request_timeout_s to answer)."""
    shared_root: str | None = None
    """The shared data folder with tools/ (for data.source=toolset); empty = ../shared/data beside the repo."""
    run_name: str | None = None
    """The run tag in the TREC run file; empty = `<kind>[-<index>][+instr]`."""
    max_new_tokens: int = 128
    """task=toolcall predictions=agent: tokens the policy may write per question (greedy, stops at `</calls>`)."""
    agent: str = "exsearch"
    """task=qa predictions=agent: the agent that answers, `exsearch` (`recipe.agent`'s settings) or `genground`."""
    tool_tasks: list[str] = field(default_factory=list)
    """task=instructed: the tool-retrieval tasks to score with and without their instructions (names in
    pipelines/data/toolsets.py TOOL_TASKS); empty = every task whose data is present under the shared folder."""


@dataclass
class EvaluateJobConfig(ToolSeekConfig):
    """The evaluation job's root: every group of the main job's config plus the task and its settings."""

    task: str = "retrieval"
    """What to evaluate: `retrieval` (nDCG@k, Recall@k, MRR@10, MAP@100, C@k over a corpus and qrels), `toolcall`
    (BFCL's AST check of tool calls, pipelines/toolcall_check.py) or `qa` (EM / F1 / accuracy, supporting-passage
    recall; pipelines/qa_data.py)."""
    predictions: str = "agent"
    """toolcall and qa: what is scored. `gold` (the gold answers themselves: a self-check), a JSON-lines file (formats
    in pipelines/toolcall_check.py and pipelines/qa_data.py), `retrieval` (qa: the configured retriever's passages,
    in-process) or `agent` (toolcall: the configured policy writes the calls, pipelines/toolcall_predict.py; qa: the
    `evaluate.agent` agent answers, searching the set's passages in-process)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


EVALUATE_SCHEMA_NAME = "toolseek_evaluate_schema"
ConfigStore.instance().store(name=EVALUATE_SCHEMA_NAME, node=EvaluateJobConfig)


@dataclass
class StudySettings:
    """One setting of every factor the study varies: the baseline, and each run's values (pipelines/study.py)."""

    temperature: float = 0.7
    """Decoding temperature of every model turn (0 = greedy: every seed gives the same run)."""
    max_steps: int = 4
    """Searches allowed before a run is cut off."""
    top_k: int = 2
    """Passages retrieved per search."""
    doc_order: str = "retrieved"
    """The order passages are shown in: `retrieved` (best first), `reversed` or `shuffled` (seeded)."""
    corpus_fraction: float = 1.0
    """Share of the non-gold passages kept in the index (every passage a studied question needs stays): the size of
    the pool the agent searches."""
    prompt: str = "plain"
    """The system prompt: a name in pipelines.study.PROMPTS (`plain` is the one the policy was trained on)."""
    paraphrase: str = "none"
    """How each question is reworded before the agent sees it: a name in pipelines.study.PARAPHRASES."""


@dataclass
class StudyLevels:
    """The levels swept per factor, one factor at a time around the baseline (the others held at the baseline)."""

    temperature: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    max_steps: list[int] = field(default_factory=lambda: [1, 4])
    top_k: list[int] = field(default_factory=lambda: [1, 2, 4])
    doc_order: list[str] = field(default_factory=lambda: ["retrieved", "reversed", "shuffled"])
    corpus_fraction: list[float] = field(default_factory=lambda: [0.25, 1.0])
    prompt: list[str] = field(default_factory=lambda: ["plain", "instructed"])
    paraphrase: list[str] = field(default_factory=lambda: ["none", "lowercase", "prefixed"])


@dataclass
class StudyConfig:
    """The factor study's grid, seeds, questions and the warm start that gives it a policy worth studying."""

    factors: list[str] = field(default_factory=lambda: ["temperature", "max_steps", "top_k", "doc_order",
                                                        "corpus_fraction", "prompt", "paraphrase"])  # fmt: skip
    """Which factors to sweep (names of StudySettings fields)."""
    baseline: StudySettings = field(default_factory=StudySettings)
    levels: StudyLevels = field(default_factory=StudyLevels)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Sampling seeds (and shuffle seeds): each setting runs once per seed; the table reports mean, std, stability."""
    questions: int = 30
    """Held-out test questions of the world each run answers (the same questions in every run)."""
    metric: str = "valid_rate"
    """The metric the stability score, the factor summary and the plots use: em, f1, acc, valid_rate or
    mean_searches. `valid_rate` by default: the tiny policy learns the protocol in a short warm start but hardly any
    answers, so its F1 is near zero everywhere; with a real policy (`study.policy_path`) use `f1`."""
    tolerance: float = 0.05
    """Stability = share of seeds whose metric lies within ±tolerance (absolute) of the mean over seeds."""
    policy_path: str | None = None
    """A trained policy folder to study; empty = build the tiny policy and SFT it on ExSearch demonstrations here."""
    warm_start_questions: int = 120
    warm_start_steps: int = 150
    warm_start_lr: float = 3e-3
    warm_start_batch_size: int = 8


@dataclass
class StudyJobConfig(ToolSeekConfig):
    """The factor study's root (`python -m pipelines.study`): the main job's groups plus the study's grid."""

    study: StudyConfig = field(default_factory=StudyConfig)


STUDY_SCHEMA_NAME = "toolseek_study_schema"
ConfigStore.instance().store(name=STUDY_SCHEMA_NAME, node=StudyJobConfig)
