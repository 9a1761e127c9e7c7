"""Interoperability with other tools' model formats: :mod:`medclf.interop.monai_bundle` (MONAI bundles)."""
