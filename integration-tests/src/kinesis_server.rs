//! kinesis-local (npm `kinesis-local@0.6.2`).
