// Error kinds: each becomes one line on stderr and an exit status (see main.cpp).
#pragma once

#include <stdexcept>
#include <string>

namespace spleen {

// The user's input (image, model, output path, arguments) cannot be used: exit status 2.
struct InputError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace spleen
