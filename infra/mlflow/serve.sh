#!/bin/sh
# Start the MLflow tracking server from environment variables (compose .env or Kubernetes Secret):
#   MLFLOW_BACKEND_STORE_URI   postgresql://user:password@host:5432/mlflow   (runs, registry)
#   MLFLOW_AUTH_DATABASE_URI   postgresql://user:password@host:5432/mlflow_auth (basic-auth users)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix, with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
#                                 and MLFLOW_S3_ENDPOINT_URL for a non-AWS S3-compatible store
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD  the first admin (no default password)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the auth app, the same on every replica
#   MLFLOW_ALLOWED_HOSTS       Host headers the server answers (DNS-rebinding protection)
#   MLFLOW_CREATE_BUCKET=true  create the bucket first (compose's MinIO; not for a managed store)
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?}" "${MLFLOW_AUTH_DATABASE_URI:?}" "${MLFLOW_ARTIFACTS_DESTINATION:?}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}" "${MLFLOW_ALLOWED_HOSTS:?}"

# basic_auth.ini has no variable expansion, so it is written here, outside the image, readable
# only by this user: it holds the auth database's password.
umask 077
export MLFLOW_AUTH_CONFIG_PATH="${HOME}/basic_auth.ini"
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

if [ "${MLFLOW_CREATE_BUCKET:-false}" = true ]; then
  python - <<'PY'
import os
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError

bucket = urlparse(os.environ["MLFLOW_ARTIFACTS_DESTINATION"]).netloc
s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
try:
    s3.head_bucket(Bucket=bucket)
except ClientError:
    s3.create_bucket(Bucket=bucket)
PY
fi

# --host 0.0.0.0 is the container's interface; what reaches it is decided by the published port
# (compose: a private address) or the ClusterIP Service and NetworkPolicy (Kubernetes).
exec mlflow server \
  --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-4}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --app-name basic-auth \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
