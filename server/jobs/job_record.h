// The server's view of one job: the tune.v1.Job that clients see plus the
// bookkeeping that only the server needs.
#ifndef TUNE_SERVER_JOBS_JOB_RECORD_H_
#define TUNE_SERVER_JOBS_JOB_RECORD_H_

#include <cstdint>

#include "tune/v1/job.pb.h"

namespace tune::server {

struct JobRecord {
  // Everything clients see. `job.last_event_seq` is maintained by the store
  // (it assigns event sequence numbers); `job.pending_reason` is never stored.
  v1::Job job;
  // Position in the FIFO among jobs of equal priority; assigned by the store.
  int64_t submit_order = 0;
  // Retries consumed by lost workers (at most job.spec().max_retries()).
  int32_t retries_used = 0;

  const std::string& id() const { return job.id(); }
  v1::JobState state() const { return job.state(); }
  int32_t priority() const { return job.spec().priority(); }
  int32_t max_retries() const { return job.spec().max_retries(); }
};

}  // namespace tune::server

#endif  // TUNE_SERVER_JOBS_JOB_RECORD_H_
