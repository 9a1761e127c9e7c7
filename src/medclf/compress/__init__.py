"""Model compression and fast inference: ONNX export, int8 quantisation, structured pruning, distillation.

``medclf export BUNDLE --data DATA [--onnx] [--int8] [--prune AMOUNT] [--distill-from TEACHER]
[--student ARCH] --out BUNDLE2`` or :func:`export_bundle` (``medclf.export``). The result is an ordinary
bundle; which engine runs it is chosen in :mod:`medclf.engines`.
"""

from medclf.compress.pipeline import ExportResult, export_bundle

__all__ = ["ExportResult", "export_bundle"]
