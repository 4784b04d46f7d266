//! The qcow2 converter: the cocoon-format-qcow2 parser, run over the host's
//! read-at source by the SDK's native-format adapter.

cocoon_plugin_sdk::export_format_converter!(
    cocoon_plugin_sdk::format_converter::native::Native<cocoon_format_qcow2::Qcow2>
);
