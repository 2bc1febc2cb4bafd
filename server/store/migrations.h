// The SQL migrations of the job store, embedded at build time from
// server/store/migrations/NNNN_name.sql (see embed_migrations.cmake).
#ifndef TUNE_SERVER_STORE_MIGRATIONS_H_
#define TUNE_SERVER_STORE_MIGRATIONS_H_

#include <string>
#include <vector>

namespace tune::server {

struct Migration {
  int version;       // NNNN of the file name; 1, 2, 3, ... without gaps.
  std::string name;  // File name without ".sql", e.g. "0001_init".
  std::string sql;   // Statements, run in one transaction.
};

// In ascending version order.
const std::vector<Migration>& EmbeddedMigrations();

}  // namespace tune::server

#endif  // TUNE_SERVER_STORE_MIGRATIONS_H_
