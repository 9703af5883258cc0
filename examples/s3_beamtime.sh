#!/usr/bin/env bash
# Analyse an archived beamtime on S3 without copying it: raw files, workspace and model all at s3:// URLs.
# Credentials come from the environment only; they are never written into stores, logs or the job store.
set -euo pipefail
export AWS_PROFILE=${AWS_PROFILE:-beamline}                 # or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
# export XRDSCALE_S3_ENDPOINT_URL=https://s3.my-facility.org  # MinIO / Ceph endpoints
export XRDSCALE_JOB_STORE_URL=${XRDSCALE_JOB_STORE_URL:?a PostgreSQL URL for the job store, e.g. postgresql+psycopg://user@db/xrdscale}
# jobs/s3-beamtime.yaml names raw files such as s3://my-beamtime/raw/c7_4.20V.nxs
xrdscale campaign run jobs/s3-beamtime.yaml --workspace "s3://${BUCKET:?set BUCKET}/analysis/$(date +%Y-%m)"
xrdscale campaign status jobs/s3-beamtime.yaml --workspace "s3://$BUCKET/analysis/$(date +%Y-%m)"
