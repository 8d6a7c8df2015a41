//! moto and dynalite, the DynamoDB stand-ins.
