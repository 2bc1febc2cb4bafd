-- Initial schema. States, reasons and event types are the integer values of
-- the tune.v1 enums (JobState, FailureReason, EventType, WorkerState).
-- Times are microseconds since the Unix epoch; NULL means "not yet".

CREATE TABLE jobs (
  id                   TEXT PRIMARY KEY,
  submit_order         INTEGER NOT NULL UNIQUE,
  name                 TEXT NOT NULL,
  spec_yaml            TEXT NOT NULL,
  spec                 BLOB NOT NULL,          -- serialized tune.v1.JobSpec
  state                INTEGER NOT NULL,
  reason               INTEGER NOT NULL DEFAULT 0,
  message              TEXT NOT NULL DEFAULT '',
  priority             INTEGER NOT NULL DEFAULT 0,
  attempt              INTEGER NOT NULL DEFAULT 1,
  retries_used         INTEGER NOT NULL DEFAULT 0,
  max_retries          INTEGER NOT NULL DEFAULT 0,
  worker               TEXT NOT NULL DEFAULT '',
  devices              TEXT NOT NULL DEFAULT '', -- comma-separated indices
  created_us           INTEGER NOT NULL,
  started_us           INTEGER,
  finished_us          INTEGER,
  last_step            INTEGER NOT NULL DEFAULT 0,
  last_loss            REAL NOT NULL DEFAULT 0,
  last_checkpoint_step INTEGER NOT NULL DEFAULT 0,
  next_event_seq       INTEGER NOT NULL DEFAULT 1,
  cancel_requested     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_state ON jobs(state, priority DESC, submit_order);

CREATE TABLE events (
  job_id       TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  seq          INTEGER NOT NULL,              -- per job, 1, 2, 3, ... no gaps
  attempt      INTEGER NOT NULL,              -- 0 for server events
  rank         INTEGER NOT NULL,              -- -1 for agent/server events
  source_seq   INTEGER,                       -- worker numbering; NULL for server events
  type         INTEGER NOT NULL,
  time_us      INTEGER NOT NULL,
  payload_json TEXT NOT NULL,
  PRIMARY KEY (job_id, seq),
  UNIQUE (job_id, attempt, source_seq)        -- a resent agent event is stored once
) WITHOUT ROWID;

CREATE TABLE workers (
  name              TEXT PRIMARY KEY,
  info              BLOB NOT NULL,            -- serialized tune.v1.WorkerInfo
  state             INTEGER NOT NULL,
  last_heartbeat_us INTEGER NOT NULL
);
