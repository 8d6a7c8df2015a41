struct Order {}

#[kcl::handler]
async fn handle(order: Order) {
    let _ = order;
}

fn main() {}
