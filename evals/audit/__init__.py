"""Batch generation audits (:mod:`.run`)."""

from .run import (
    METRICS_SCHEMA,
    ORIGINAL,
    SCHEMA_VERSION,
    AuditError,
    AuditModel,
    check_output_folder,
    generate_audit_images,
    generation_summary,
    image_name,
    per_concept_table,
    run_audit,
    summary_table,
)

__all__ = [
    "METRICS_SCHEMA",
    "ORIGINAL",
    "SCHEMA_VERSION",
    "AuditError",
    "AuditModel",
    "check_output_folder",
    "generate_audit_images",
    "generation_summary",
    "image_name",
    "per_concept_table",
    "run_audit",
    "summary_table",
]
