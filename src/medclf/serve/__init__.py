"""Deployment: the HTTP API with its web page (``app``) and the DICOM node (``dicom_node``).

A leaf of the package: nothing else in medclf imports ``medclf.serve``.
"""
