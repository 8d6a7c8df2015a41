kcl::service!();
