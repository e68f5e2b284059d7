"""Initial schema: patients, studies, series, instances, jobs, results, deliveries, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Self-contained on purpose (no import of storage.tables): a migration describes the schema
as it was at this revision, whatever the tables become later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _uid(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length=64), nullable=nullable)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id(table: str) -> tuple[sa.Column, sa.PrimaryKeyConstraint]:
    return (sa.Column("id", sa.Integer(), nullable=False),
            sa.PrimaryKeyConstraint("id", name=f"pk_{table}"))


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"],
                                   name=f"fk_{table}_{column}_{target}")


def upgrade() -> None:
    op.create_table(
        "patients", *_id("patients"),
        sa.Column("key", sa.String(length=128), nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint("key", name="uq_patients_key"),
    )
    op.create_table(
        "studies", *_id("studies"),
        _uid("study_uid"),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        _ts("first_received_at"),
        _ts("last_received_at"),
        _fk("studies", "patient_id", "patients"),
        sa.UniqueConstraint("study_uid", name="uq_studies_study_uid"),
    )
    op.create_index("ix_studies_patient_id", "studies", ["patient_id"])
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"])

    op.create_table(
        "series", *_id("series"),
        _uid("series_uid"),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        _fk("series", "study_id", "studies"),
        sa.UniqueConstraint("series_uid", name="uq_series_series_uid"),
    )
    op.create_index("ix_series_study_id", "series", ["study_id"])

    op.create_table(
        "instances", *_id("instances"),
        _uid("sop_instance_uid"),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        _uid("sop_class_uid"),
        _uid("transfer_syntax"),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        _ts("received_at"),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("laterality", sa.String(length=16), nullable=True),
        sa.Column("view", sa.String(length=64), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        _fk("instances", "study_id", "studies"),
        _fk("instances", "series_id", "series"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )
    op.create_index("ix_instances_study_id", "instances", ["study_id"])
    op.create_index("ix_instances_series_id", "instances", ["series_id"])

    op.create_table(
        "jobs", *_id("jobs"),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("rerun", sa.Boolean(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("last_instance_at"),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("queued_at", nullable=True),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _fk("jobs", "study_id", "studies"),
        sa.UniqueConstraint("study_id", name="uq_jobs_study_id"),
    )
    op.create_index("ix_jobs_state_queued_at", "jobs", ["state", "queued_at"])

    op.create_table(
        "results", *_id("results"),
        _uid("sop_instance_uid"),
        sa.Column("study_id", sa.Integer(), nullable=False),
        _uid("series_uid"),
        sa.Column("job_id", sa.Integer(), nullable=True),
        _uid("sop_class_uid"),
        _uid("transfer_syntax"),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        _ts("created_at"),
        _fk("results", "study_id", "studies"),
        _fk("results", "job_id", "jobs"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_results_sop_instance_uid"),
    )
    op.create_index("ix_results_study_id", "results", ["study_id"])
    op.create_index("ix_results_job_id", "results", ["job_id"])

    op.create_table(
        "deliveries", *_id("deliveries"),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at"),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.Column("last_status", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("delivered_at", nullable=True),
        _fk("deliveries", "result_id", "results"),
        sa.UniqueConstraint("result_id", "destination", name="uq_deliveries_result_id"),
    )
    op.create_index("ix_deliveries_state_next_attempt_at", "deliveries",
                    ["state", "next_attempt_at"])

    op.create_table(
        "audit_events", *_id("audit_events"),
        _ts("at"),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("called_ae", sa.String(length=16), nullable=True),
        sa.Column("peer", sa.String(length=255), nullable=True),
        _uid("study_uid", nullable=True),
        _uid("sop_instance_uid", nullable=True),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])


def downgrade() -> None:
    for table in ("audit_events", "deliveries", "results", "jobs", "instances", "series",
                  "studies", "patients"):
        op.drop_table(table)
