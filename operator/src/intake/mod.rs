//! The report intake: sensors post detections over HTTPS, the intake authenticates them with a
//! TokenReview, checks them (pure) and writes the bans they call for.

pub mod authentic;
pub mod checks;
pub mod review;
pub mod server;
pub mod tls;
