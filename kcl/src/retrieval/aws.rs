//! `AwsKinesis`: the `KinesisApi` seam over `aws-sdk-kinesis`.
