//! `DynamoLeaseStore`: the `LeaseStore` seam over `aws-sdk-dynamodb`.
