"""Settings of ``lorag train``: the ``[training]`` section on top of the shared settings."""

from typing import Literal

from pydantic import BaseModel, Field

from core.prompt import ABSTENTION_ANSWER
from core.settings import Settings


class TrainingSettings(BaseModel):
    """Hyperparameters of one fine-tuning run; CLI flags override the TOML ``[training]`` table."""

    base_model: str | None = Field(None, description="hub id or local path of the base model")
    method: Literal["lora", "qlora", "dora"] = "lora"
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = Field("all-linear", description="'all-linear' or comma-separated module names")

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    lr: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(2048, ge=16)
    val_split: float = Field(0.1, ge=0, lt=1)
    packing: bool = False
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on CUDA when supported")
    loss_chunk_tokens: int = Field(1024, ge=16, description="tokens per lm_head chunk in the loss")
    compile: bool = Field(False, description="torch.compile each decoder layer (one graph shared by all layers)")

    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps; default once per epoch")
    save_steps: int | None = Field(None, ge=1, description="resumable checkpoint every N steps")
    patience: int | None = Field(None, ge=1, description="evaluations without val improvement before stopping")
    logging_steps: int = Field(1, ge=1)
    seed: int = 0
    strict: bool = Field(False, description="fail on the first bad record instead of skipping it")

    with_retrieval: bool = False
    k: int = Field(4, ge=1, le=50, description="passages per RAFT example")
    raft_no_oracle_p: float = Field(0.2, ge=0, le=1, description="share of examples trained without the oracle")
    raft_distractors: int = Field(2, ge=0, description="passages from other questions mixed in")
    raft_no_answer: str = Field(ABSTENTION_ANSWER, description="the answer when the oracle is left out: the "
                                "server's own abstention, so a trained adapter declines in the words lorag uses")
    replay_data: str | None = Field(None, description="general prompts (JSON/JSONL with 'question') whose base-model "
                                    "answers are mixed into training so the adapter keeps what the base does without "
                                    "documents (training.replay)")
    replay_share: float = Field(0.25, ge=0, lt=1, description="share of training examples that are replayed answers")
    replay_max_tokens: int = Field(128, ge=1, description="tokens per replayed answer; longer ones are left out")
    raft_cite: bool = Field(True, description="target answers cite the oracle passage's [n]")

    @property
    def target_module_list(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


class TrainSettings(Settings):
    training: TrainingSettings = TrainingSettings()
