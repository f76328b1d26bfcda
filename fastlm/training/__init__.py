"""Fine-tuning workflow: chat data, response-only masking, untrained-token repair, callbacks, TRL glue and the
`fastlm train` config (the run itself is fastlm.jobs.train). Heavy stacks (TRL, datasets, matplotlib) load when used."""
from .callbacks import LossPlotCallback, ThroughputCallback, save_loss_plot
from .chat_templates import CHAT_TEMPLATES, get_chat_template, template_markers
from .data_formats import apply_chat_template, standardize_data_formats, to_sharegpt
from .config import TrainConfig, load_config
from .response_masking import ResponseMaskingError, train_on_responses_only
from .untrained_tokens import fix_untrained_tokens

__all__ = ["CHAT_TEMPLATES", "LossPlotCallback", "ResponseMaskingError", "ThroughputCallback", "TrainConfig",
           "apply_chat_template", "fix_untrained_tokens", "get_chat_template", "load_config",
           "save_loss_plot", "standardize_data_formats", "template_markers", "to_sharegpt", "train_on_responses_only"]
