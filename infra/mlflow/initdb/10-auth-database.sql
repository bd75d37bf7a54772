-- MLflow's basic-auth users live in their own database beside the tracking store (same server,
-- same owner): run once by the postgres image on an empty data directory.
CREATE DATABASE mlflow_auth;
