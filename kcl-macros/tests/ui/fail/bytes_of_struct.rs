#[derive(serde::Deserialize)]
struct Order {}

#[kcl::handler(bytes)]
async fn handle(order: Order) {
    let _ = order;
}

fn main() {}
