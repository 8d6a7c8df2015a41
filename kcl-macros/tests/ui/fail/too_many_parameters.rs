#[derive(serde::Deserialize)]
struct Order {}

#[kcl::handler]
async fn handle(order: Order, record: &kcl::Record, extra: u32) {
    let _ = (order, record, extra);
}

fn main() {}
