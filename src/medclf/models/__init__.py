"""Model registry. Importing this package registers every built-in architecture."""

from medclf.models import compact as _compact  # noqa: F401  (registers)
from medclf.models import ensemble as _ensemble  # noqa: F401  (registers)
from medclf.models import monai_nets as _monai_nets  # noqa: F401  (registers)
from medclf.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
